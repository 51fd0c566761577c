"""`rlhfkit chat` and the export on the models users point them at: a model trained on plain prompts chats and
exports in the format it learned, and any directory that is not a chat model is a message, never a traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from test_pipeline import pipeline_config
from test_training import ENV, run_ok, synthetic_pairs

TURNS = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "With flour."},
         {"role": "user", "content": "And then?"}]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """SFT and RM on the tiny model (whose tokenizer has a ChatML template) with data.template: plain."""
    tmp = tmp_path_factory.mktemp("plain")
    data = write_jsonl(tmp / "pairs.jsonl", synthetic_pairs(40))
    cfg = pipeline_config(tmp, data, data={"template": "plain", "system_prompt": "Answer briefly."})
    run_ok(["sft", str(cfg), "--no-progress"])
    run_ok(["rm", str(cfg), "--no-progress"])
    return tmp / "run"


def bos_adding(tok):
    """The tiny tokenizer, changed to put BOS before every text it encodes (as Llama's and OPT's do)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok.name_or_path)  # a copy: the session's tokenizer stays as it is
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.mark.parametrize("system_prompt", [None, 'Say "hi" 😀\n{{ not jinja }} \\ end'])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_plain_template_gives_the_text_and_ids_the_data_was_rendered_with(tiny_tokenizer, system_prompt, adds_bos):
    from rlhfkit.config import DataConfig
    from rlhfkit.data.plain_template import encoding_prefix, plain_chat_template
    from rlhfkit.data.render import Renderer

    tok = bos_adding(tiny_tokenizer) if adds_bos else tiny_tokenizer
    data = DataConfig(datasets=[{"name": "d", "path": "unused.jsonl"}], template="plain", system_prompt=system_prompt)
    renderer = Renderer(tok, data)
    assert encoding_prefix(tok) == ("<s>" if adds_bos else "")
    template = plain_chat_template(encoding_prefix(tok), system_prompt)
    for turns in (TURNS[:1], TURNS, [{"role": "system", "content": "Be kind."}, *TURNS]):
        text = renderer.prompt_text(turns)
        chat_text = tok.apply_chat_template(turns, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert chat_text == encoding_prefix(tok) + text
        # chat encodes the template's text without special tokens; the data encoded its own with them
        assert tok(chat_text, add_special_tokens=False)["input_ids"] == renderer.encode_prompts([text])[0]


def test_a_plain_trained_model_chats_in_its_format_from_final_and_from_the_export(plain_run, tmp_path):
    """Old code: final/ kept the tokenizer's ChatML template, so chat spoke a format the model never saw, and
    the export and its GGUF carried the same."""
    import gguf

    from rlhfkit.chat import load_chat_model
    from rlhfkit.export import export_hf, write_gguf

    want = "System: Answer briefly.\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?\n\nAssistant:"
    _, tok = load_chat_model(str(plain_run / "sft" / "final"))
    assert tok.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True) == want
    _, tok = load_chat_model(str(plain_run / "sft" / "checkpoints" / "step-0000004"))  # a checkpoint's model/
    assert tok.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True) == want

    hf = export_hf(plain_run / "sft" / "final", tmp_path / "hf")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(hf).apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True) == want
    reader = gguf.GGUFReader(write_gguf(hf, tmp_path / "m.gguf", "f16"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == AutoTokenizer.from_pretrained(hf).chat_template

    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(hf), "--max-new-tokens", "4", "--seed", "0"],
                       input="Hello\n/exit\n", env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("rlhfkit chat"), p.stderr[-2000:]


def tiny_without_template(dest: Path) -> Path:
    from rlhfkit.config import TinyModelConfig
    from rlhfkit.models.builtin import materialize_builtin

    shutil.copytree(materialize_builtin("tiny-random", TinyModelConfig(chat_template=False)), dest)
    return dest


def test_a_base_model_without_a_template_chats_plain_after_training_on_auto(tmp_path, prefs_file):
    """`template: auto` on a tokenizer without a chat template renders plain: its stage's record says so.
    Old code: chat raised a ValueError traceback."""
    from rlhfkit.chat import load_chat_model
    from rlhfkit.config import Config, save_resolved_config
    from rlhfkit.errors import ModelLoadError

    final = tiny_without_template(tmp_path / "run" / "sft" / "final")
    cfg = Config.model_validate({"run": {"output_dir": str(tmp_path / "run")},
                                 "data": {"datasets": [{"name": "p", "path": str(prefs_file)}]}})
    save_resolved_config(cfg, tmp_path / "run" / "sft")
    _, tok = load_chat_model(str(final))
    assert tok.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True) == \
        "Human: How do I bake bread?\n\nAssistant:"
    # the same model without its run's record: nothing says which format it learned
    with pytest.raises(ModelLoadError, match="the tokenizer has no chat template, and no run record says"):
        load_chat_model(str(shutil.copytree(final, tmp_path / "elsewhere")))


def _damaged(plain_run: Path, tmp_path: Path, what: str) -> Path:
    out = shutil.copytree(plain_run / "sft" / "final", tmp_path / what)
    if what == "no-weights":
        (out / "model.safetensors").unlink()
    elif what == "tokenizer":
        (out / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    elif what == "other-architecture":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return out


@pytest.mark.parametrize("target,message", [
    ("rm/final", "is a reward model (it scores text, it does not write any)"),
    (".", "not a model directory (no config.json); chat models in it: sft/final"),
    ("sft", "not a model directory (no config.json); chat models in it: final"),
    ("nowhere", "no such model directory"),
    ("file.gguf", "is a file (a GGUF file: chat with it in llama.cpp)"),
    ("damaged:no-weights", "no model weights (none of model.safetensors"),
    ("damaged:tokenizer", "cannot load the tokenizer"),
    ("damaged:other-architecture", "model.safetensors does not hold the weights config.json describes"),
    ("no-template", "the tokenizer has no chat template"),
])
def test_chat_on_what_is_not_a_chat_model_says_what_it_is(plain_run, tmp_path, capsys, target, message):
    """Each a message (exit 2), none a traceback. Old code: a reward model chatted through its backbone,
    weights of another architecture loaded at random, a damaged tokenizer raised KeyError."""
    from rlhfkit.cli import main

    if target.startswith("damaged:"):
        path = _damaged(plain_run, tmp_path, target.split(":")[1])
    elif target == "file.gguf":
        path = tmp_path / "model.gguf"
        path.write_bytes(b"GGUF")
    elif target == "no-template":
        path = tiny_without_template(tmp_path / "base")
    else:
        path = plain_run / target
    assert main(["chat", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rlhfkit: error:" in err.splitlines()[-1] and message in err.splitlines()[-1], err


def test_a_conversation_too_long_for_the_model_is_a_message_and_the_chat_goes_on(tmp_path, tiny_tokenizer):
    """GPT-2's learned positions end at n_positions. Old code: generate() failed in its thread and chat waited
    for the stream forever."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                               eos_token_id=tiny_tokenizer.eos_token_id)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(model_dir), "--max-new-tokens", "4"],
                       input="word " * 40 + "\n/reset\nhi\n", env=ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[no reply: index out of range in self (" in p.stdout and "the model takes 32). /reset" in p.stdout
    assert "[conversation reset]" in p.stdout and "Traceback" not in p.stderr


def test_a_template_that_refuses_the_conversation_is_a_message(plain_run, tmp_path):
    """E.g. Gemma's template has no system role; old code: a jinja2 TemplateError traceback for --system."""
    model = shutil.copytree(plain_run / "sft" / "final", tmp_path / "no-system")  # no run record: its own template
    (model / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    p = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "chat", str(model), "--system", "be brief"],
                       input="hi\n", env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert ("rlhfkit: error: the model's chat template refuses this conversation: System role not supported"
            in p.stderr.splitlines()[-1])
