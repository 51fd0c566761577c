"""Export: the aligned model as a plain Hugging Face directory and as a GGUF file for llama.cpp-based tools.

The HF directory holds merged weights (safetensors), tokenizer, chat template (the plain one for a model
trained on plain prompts, data/plain_template.py) and generation config, and loads with
`AutoModelForCausalLM.from_pretrained` alone. The GGUF file (f16 or q8_0) is written with
the `gguf` package in llama.cpp's layout for Llama-architecture models (SmolLM2, Llama, Mistral-style):
tensor names, q/k rows permuted to GGML's rotary layout, and the byte-level BPE tokenizer (tokens, types,
merges, special ids, chat template), as llama.cpp's own convert_hf_to_gguf.py writes them (a q8_0 file's
tensors are byte-identical to its `--outtype q8_0`). `check_gguf` reads the file back through transformers'
GGUF loader and compares logits with the HF model; `llamacpp_agreement` runs it in llama.cpp itself
(llama-cpp-python, optional; benchmarks/gguf_llamacpp.py) and compares greedy chat replies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .data.plain_template import plain_template_for
from .errors import ConfigError, RlhfkitError
from .paths import make_temp_dir, publish_dir

GGUF_TYPES = ("f16", "q8_0")
GGUF_ARCHITECTURES = ("llama", "mistral")  # config.json's model_type
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def export_hf(src: Path, out: Path) -> Path:
    """Copy a stage's final model (already merged) into a clean HF directory, published in one rename; a
    model trained on plain prompts gets the plain chat template in its tokenizer files."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    src = Path(src)
    if (src / "adapter_model.safetensors").is_file() and not (src / "model.safetensors").is_file():
        raise ConfigError(f"{src} holds a LoRA adapter only; export needs merged weights (lora.save: merged)")
    if not (src / "model.safetensors").is_file():
        raise ConfigError(f"{src}: no model.safetensors to export")
    tmp = make_temp_dir(out)
    for name in _HF_FILES:
        if (src / name).is_file():
            # content only: safetensors writes its files owner-only, and copy2 would carry that mode along
            shutil.copyfile(src / name, tmp / name)
    if not (tmp / "generation_config.json").is_file():
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(src)).save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(src)
    template = plain_template_for(src, tok)
    if template:
        tok.chat_template = template
        tok.save_pretrained(tmp)
    publish_dir(tmp, out)
    return out


def gguf_problem(config: dict, tokenizer_spec: dict | None) -> str | None:
    """Why write_gguf cannot write a model (its config.json and, where known, its tokenizer.json), or None."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        return (f"GGUF export covers Llama-architecture models (model_type {', '.join(GGUF_ARCHITECTURES)}); "
                f"this one is {model_type!r}")
    if tokenizer_spec is None:
        return None
    kind = (tokenizer_spec.get("model") or {}).get("type")
    if kind != "BPE" or '"ByteLevel"' not in json.dumps(tokenizer_spec.get("pre_tokenizer")):
        # e.g. Llama-2's SentencePiece BPE: written as GPT-2 BPE, llama.cpp would split text into other tokens
        return f"GGUF export covers byte-level BPE tokenizers (SmolLM2, Llama 3 style); this one is {kind} without ByteLevel"
    return None


def gguf_export_problem(cfg) -> str | None:
    """Why `export.gguf` cannot be produced for this run's model, read from the config.json and tokenizer.json
    of the model training starts from (no weights loaded; both built-ins are Llama models with byte-level
    BPE); None when it can, when export.gguf is auto or none, or when those files cannot be read here."""
    from .models.builtin import BUILTIN_NAMES
    from .models.loading import model_file

    qtype = cfg.export.gguf
    start = {"ppo": cfg.ppo.actor_model, "dpo": cfg.dpo.model}[cfg.pipeline.alignment] or cfg.model.name_or_path
    if qtype in ("auto", "none") or start in BUILTIN_NAMES:
        return None
    base = start == cfg.model.name_or_path
    revision = cfg.model.revision if base else None
    config_file = model_file(start, "config.json", revision)
    if config_file is None:
        return None
    tokenizer_file = model_file((cfg.model.tokenizer or start) if base else start, "tokenizer.json", revision)
    try:
        problem = gguf_problem(json.loads(config_file.read_text(encoding="utf-8")),
                               json.loads(tokenizer_file.read_text(encoding="utf-8")) if tokenizer_file else None)
    except (ValueError, AttributeError):  # not JSON objects: loading the model will say so
        return None
    if problem is None:
        return None
    return (f"export.gguf: {qtype} cannot be written for {start}: {problem}. Set export.gguf to none (or null: "
            f"the HF directory only) or auto (f16 where the model allows it, else none); its values are auto, "
            f"{', '.join(GGUF_TYPES)}, none")


def gguf_type(setting: str, hf_dir: Path) -> tuple[str | None, str | None]:
    """(the GGUF type to write or None, why none is written) for `export.gguf` and an exported HF directory."""
    if setting == "none":
        return None, "export.gguf is none"
    if setting != "auto":
        return setting, None
    tokenizer = hf_dir / "tokenizer.json"
    problem = gguf_problem(json.loads((hf_dir / "config.json").read_text(encoding="utf-8")),
                           json.loads(tokenizer.read_text(encoding="utf-8")) if tokenizer.is_file() else None)
    return ("f16", None) if problem is None else (None, f"export.gguf auto: {problem}")


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows → GGML's interleaved pairs (llama.cpp's convert script does the same)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        key = ".".join(parts[3:-1])
        if key in _LAYER_NAMES:
            return f"blk.{parts[2]}.{_LAYER_NAMES[key]}.weight"
    return None


def write_gguf(model_dir: Path, out_file: Path, qtype: str = "f16") -> Path:
    """Write model_dir (a Llama-architecture HF directory) as one GGUF file, atomically."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    if qtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF type must be one of {GGUF_TYPES}, got {qtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    problem = gguf_problem(json.loads((model_dir / "config.json").read_text(encoding="utf-8")),
                           json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
    if problem:
        raise ConfigError(f"{model_dir}: {problem}; set export.gguf: none (or auto)")
    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    tmp = out_file.with_name(out_file.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(model_dir.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)  # llama.cpp assumes hidden/heads without them
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok, model_dir, cfg.vocab_size)

    for name, tensor in weights.items():
        gname = _gguf_tensor_name(name)
        if gname is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for tensor {name!r}")
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute_rotary(data, n_head)
        elif name.endswith("k_proj.weight"):
            data = _permute_rotary(data, n_kv)
        if data.ndim == 1:  # norms stay f32, as llama.cpp writes them
            w.add_tensor(gname, data.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out_file)
    return out_file


def _add_tokenizer(w, tok, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE ("gpt2" in GGUF): tokens by id, their types, merges, special ids, chat template."""
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))  # byte-level BPE (gguf_problem)
    added = {t["id"]: t.get("special", False) for t in spec.get("added_tokens", [])}
    special = set(tok.all_special_ids) | {i for i, is_special in added.items() if is_special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i < len(tok):
            tokens.append(tok.convert_ids_to_tokens(i))
            types.append(3 if i in special else 4 if i in added else 1)  # control / user-defined / normal
        else:  # embedding rows beyond the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if "smollm" in (tok.name_or_path or "").lower() else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for setter, token_id in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                             (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if token_id is not None:
            setter(int(token_id))
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


@torch.no_grad()
def check_gguf(model_dir: Path, gguf_file: Path, text: str = "Human: What is the capital of France?") -> dict:
    """Load the GGUF back through transformers and compare its logits with the HF model's on one prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    a, b = hf(ids).logits[0].float(), back(ids).logits[0].float()
    return {"max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
            "same_argmax_share": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "tokens": int(ids.shape[1])}


# Greedy chat replies through the GGUF's real consumer. transformers' GGUF reader (check_gguf) dequantizes
# to fp32 and computes in fp32; llama.cpp computes a Q8_0 matmul on activations quantized to 8 bits per
# block of 32 as well, so its logits move further (about 1-3 on SmolLM2-135M against 0.6) and a near-tie
# between two next tokens can flip: greedy text then diverges from that token on. Where the HF model's top
# token leads by at least `confident_margin`, llama.cpp must pick the same one (teacher-forced on the HF reply).
LLAMACPP_PIN = "llama-cpp-python==0.3.36"


@torch.no_grad()
def hf_greedy_replies(model_dir: Path, prompts: list[str], max_tokens: int) -> tuple[object, list[dict]]:
    """The HF model's own greedy chat replies (its chat template, EOS stops), with its logits along them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = []
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        reply = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        logits = model(torch.tensor([ids[0].tolist() + reply])).logits[0, ids.shape[1] - 1:-1]
        replies.append({"prompt": prompt, "prompt_ids": ids[0].tolist(), "reply_ids": reply, "logits": logits.numpy(),
                        "text": tok.decode(reply, skip_special_tokens=True)})
    return tok, replies


def llamacpp_agreement(gguf_file: Path, tok, replies: list[dict], max_tokens: int, first_n: int = 16,
                       confident_margin: float = 2.0) -> dict:
    """Load the GGUF in llama.cpp and compare with `replies` (from hf_greedy_replies): its greedy chat
    completion (temperature 0, the GGUF's own chat template) and its logits teacher-forced on the HF replies.
    Counts over the prompts (and reply positions), plus one row per prompt."""
    try:
        import llama_cpp
    except ImportError:
        raise RlhfkitError(f"llama-cpp-python not installed: pip install {LLAMACPP_PIN}") from None

    longest = max(len(r["prompt_ids"]) + max(len(r["reply_ids"]), max_tokens) for r in replies)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=longest + 16, n_threads=min(4, os.cpu_count() or 1),
                          logits_all=True, seed=0, verbose=False)
    rows = [_compare_reply(llm, tok, r, max_tokens, first_n, confident_margin) for r in replies]
    del llm
    counts = {key: sum(row[key] for row in rows) for key in _COUNTED}
    return {"prompts": len(rows), "first_n": first_n, "confident_margin": confident_margin, **counts,
            "max_abs_logit_diff": max(row["max_abs_logit_diff"] for row in rows), "rows": rows}


_COUNTED = ("identical", "first_n_agree", "same_prompt_tokens", "top1_agree", "positions", "confident_agree", "confident")


def _compare_reply(llm, tok, r: dict, max_tokens: int, first_n: int, confident_margin: float) -> dict:
    text = llm.create_chat_completion([{"role": "user", "content": r["prompt"]}], temperature=0.0, repeat_penalty=1.0,
                                      max_tokens=max_tokens)["choices"][0]["message"]["content"]
    prompt_ids = llm.tokenize(tok.decode(r["prompt_ids"]).encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(r["prompt_ids"] + r["reply_ids"])
    n, k = len(r["prompt_ids"]), len(r["reply_ids"])
    logits, ref = np.asarray(llm.scores[n - 1:n - 1 + k]), r["logits"]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    confident = top2[:, 1] - top2[:, 0] >= confident_margin
    agree = logits.argmax(-1) == ref.argmax(-1)
    # both texts re-tokenized: a greedy reply need not be the canonical tokenization of its own text
    first = [tok(t, add_special_tokens=False).input_ids[:first_n] for t in (text, r["text"])]
    return {"prompt": r["prompt"], "llamacpp_text": text, "hf_text": r["text"],
            "identical": text.strip() == r["text"].strip(), "first_n_agree": first[0] == first[1],
            "same_prompt_tokens": prompt_ids == r["prompt_ids"], "top1_agree": int(agree.sum()), "positions": k,
            "confident_agree": int(agree[confident].sum()), "confident": int(confident.sum()),
            "max_abs_logit_diff": float(np.abs(logits - ref).max()) if k else 0.0}
