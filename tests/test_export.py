"""Export: the HF directory and GGUF files as their consumers see them — the user's file permissions,
llama.cpp's reading of the GGUF metadata, and llama.cpp's greedy chat replies (when llama-cpp-python is
importable; see benchmarks/gguf_llamacpp.py for the path to a separate llama-cpp-python virtualenv)."""

import importlib.util
import os
import stat

import pytest
import torch

from conftest import make_config
from rlhfkit.export import GGUF_TYPES, hf_greedy_replies, write_gguf
from rlhfkit.models.builtin import _TINY_CORPUS, build_tiny_tokenizer

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed (pip install llama-cpp-python==0.3.36)")


def save_tiny_llama(out, tok, train_steps: int = 0, **config):
    """A 2-layer Llama over the tiny tokenizer; with train_steps, fitted to answer each corpus line with the
    next one, so its greedy replies are real text whose top token leads by several logits (a random model's
    near-ties would make greedy comparisons meaningless)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, **config)
    model = LlamaForCausalLM(cfg)
    if train_steps:
        lines = _TINY_CORPUS.splitlines()
        chats = [tok.apply_chat_template([{"role": "user", "content": a}, {"role": "assistant", "content": b}],
                                         return_dict=True)["input_ids"] for a, b in zip(lines, lines[1:])]
        width = max(map(len, chats))
        ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in chats])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chats])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(train_steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fitted_tiny(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("fitted") / "hf", build_tiny_tokenizer(1000, True), train_steps=100)


@pytest.fixture(scope="module")
def fitted_tiny_wide_heads(tmp_path_factory):
    """head_dim 32 with hidden 64 and 4 heads: not hidden/heads, as in some Llama-architecture models."""
    return save_tiny_llama(tmp_path_factory.mktemp("wide") / "hf", build_tiny_tokenizer(1000, True), train_steps=100,
                           head_dim=32)


def test_exported_files_get_the_users_permissions(tmp_path):
    """Under umask 022 everything export writes is group/other readable, though safetensors writes its own
    files owner-only (and the temp dirs behind the atomic renames are created owner-only)."""
    from rlhfkit.pipeline import export_run

    cfg = make_config(tmp_path, [{"name": "d", "path": str(tmp_path / "unused.jsonl")}])
    cfg.export.gguf = "q8_0"
    src = save_tiny_llama(tmp_path / "final", build_tiny_tokenizer(1000, True))
    (src / "model.safetensors").chmod(0o600)  # as safetensors writes it
    old = os.umask(0o022)
    try:
        summary = export_run(cfg, src)
    finally:
        os.umask(old)
    out = cfg.output_dir / "export"
    written = [out, *out.rglob("*")]
    assert {p.name for p in written} >= {"export", "hf", "model.safetensors", "export.json", "model-q8_0.gguf"}
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    assert summary["round_trip"]["same_argmax_share"] == 1.0


def test_gguf_metadata_as_llama_cpp_reads_it(tmp_path):
    """Added tokens marked special are control tokens (llama.cpp hides them in replies, as its own converter
    marks them), and an explicit head_dim is written (llama.cpp would assume hidden/heads)."""
    import gguf
    from tokenizers import AddedToken

    tok = build_tiny_tokenizer(1000, True)
    tok.add_tokens([AddedToken("<file_sep>", special=True), AddedToken("<plain>", special=False)])
    hf = save_tiny_llama(tmp_path / "hf", tok, head_dim=32)
    reader = gguf.GGUFReader(write_gguf(hf, tmp_path / "m.gguf", "q8_0"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    types = fields["tokenizer.ggml.token_type"]
    vocab = tok.get_vocab()
    assert types[vocab["<file_sep>"]] == gguf.TokenType.CONTROL and types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<plain>"]] == gguf.TokenType.USER_DEFINED and types[vocab["the"]] == gguf.TokenType.NORMAL
    assert fields["llama.attention.key_length"] == fields["llama.attention.value_length"] == 32
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION


@needs_llama_cpp
@pytest.mark.parametrize("model", ["fitted_tiny", "fitted_tiny_wide_heads"])
def test_llama_cpp_gives_the_hf_models_greedy_chat_replies(tmp_path, request, model):
    """The check benchmarks/gguf_llamacpp.py runs on SmolLM2, here on tiny fitted models: every GGUF type's
    greedy chat replies in llama.cpp equal the HF model's, tokens and all."""
    from rlhfkit.export import llamacpp_agreement

    model_dir = request.getfixturevalue(model)
    prompts = _TINY_CORPUS.splitlines()[:4]
    tok, replies = hf_greedy_replies(model_dir, prompts, max_tokens=24)
    assert all(len(r["reply_ids"]) >= 12 for r in replies)
    for qtype in GGUF_TYPES:
        result = llamacpp_agreement(write_gguf(model_dir, tmp_path / f"m-{qtype}.gguf", qtype), tok, replies, 24)
        assert result["same_prompt_tokens"] == result["identical"] == result["first_n_agree"] == len(prompts), result
        assert result["confident_agree"] == result["confident"] == result["positions"], result


@needs_llama_cpp
def test_llama_cpp_check_catches_a_broken_gguf(tmp_path, fitted_tiny, monkeypatch):
    """The check has teeth: with q/k rows left in HF's rotary order the file loads without complaint, but
    llama.cpp's replies leave the HF model's, at confident positions too."""
    import rlhfkit.export as export

    prompts = _TINY_CORPUS.splitlines()[:4]
    tok, replies = hf_greedy_replies(fitted_tiny, prompts, max_tokens=24)
    monkeypatch.setattr(export, "_permute_rotary", lambda w, n_head: w)
    result = export.llamacpp_agreement(write_gguf(fitted_tiny, tmp_path / "broken.gguf", "f16"), tok, replies, 24)
    assert result["confident_agree"] < result["confident"] and result["identical"] < len(prompts)
