import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `dtype: auto` resolves as on a CPU without native bf16 (fp32) in every test and every process a test
# starts, so results and run times are the same on either CPU kind; tests of bf16 ask for it by name.
os.environ.setdefault("RLHFKIT_NO_NATIVE_BF16", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLHFKIT_SHARED", REPO.parent / "shared"))
BAD = Path(__file__).parent / "data" / "bad"


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def pref_records(n: int, prefix: str = "p"):
    """Distinct preference pairs: multi-turn hh transcripts, short replies."""
    out = []
    for i in range(n):
        prompt = f"\n\nHuman: Question {prefix}{i}: how do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then {i}?\n\nAssistant:"
        out.append({"id": f"{prefix}{i}", "prompt": prompt, "chosen": f" Let it rise, then bake it {i}.", "rejected": f" No idea {i}."})
    return out


def make_config(tmp_path: Path, datasets: list[dict], **data):
    from rlhfkit.config import Config

    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"name_or_path": "tiny-random"},
        "data": {"datasets": datasets, "cache_dir": str(tmp_path / "cache"), "max_seq_len": 128, "max_prompt_len": 64, **data},
    }
    return Config.model_validate(raw)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path="tiny-random"))


@pytest.fixture
def prefs_file(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", pref_records(50))


def needs_shared(path: str) -> Path:
    full = SHARED / path
    if not full.exists():
        pytest.skip(f"real data not available: {full} (put the project's shared/ folder beside the checkout)")
    return full
