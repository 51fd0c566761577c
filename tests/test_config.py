from pathlib import Path

import pytest
import yaml

from rlhfkit.config import load_config, save_resolved_config
from rlhfkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"datasets": [{"name": "a", "path": "a.jsonl"}]}}


def write(tmp_path, raw) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_quickstart_loads_with_overrides():
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["data.max_seq_len=300", "data.phase_ratios=[1,1,1]"])
    assert cfg.data.max_seq_len == 300
    assert cfg.data.phase_ratios == (1.0, 1.0, 1.0)
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.data.datasets[0].path.endswith("hh_helpful_base_test.shared.jsonl.gz")


def test_override_into_list_item(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.datasets.0.max_records=7"])
    assert cfg.data.datasets[0].max_records == 7


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("data.max_seqlen=256", "data.max_seqlen", "unknown key"),
        ("data.max_seq_len=abc", "data.max_seq_len", "integer"),
        ("data.max_seq_len=4", "data.max_seq_len", "greater than or equal to 8"),
        ("data.phase_ratios=[1,-1,1]", "data.phase_ratios", "negative"),
        ("data.phase_ratios=[0,0,0]", "data.phase_ratios", "positive"),
        ("data.eval_fraction=1.5", "data.eval_fraction", "less than 1"),
        ("model.dtype=fp8", "model.dtype", "float32"),
        ("data.overlong=cut", "data.overlong", "truncate"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, override, key, words):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    msg = str(err.value)
    assert str(path) in msg and key in msg and words in msg
    assert "[from command line]" in msg


def test_unknown_key_in_file_is_named(tmp_path):
    raw = {"data": {"datasets": [{"name": "a", "path": "a.jsonl", "fromat": "sft"}]}}
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.fromat: unknown key") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_prompt_len_must_leave_room_for_response(tmp_path):
    with pytest.raises(ConfigError, match="max_prompt_len"):
        load_config(write(tmp_path, MINIMAL), ["data.max_seq_len=64", "data.max_prompt_len=64"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(write(tmp_path, MINIMAL), ["data.max_seq_len"])


def test_env_vars_with_default(tmp_path, monkeypatch):
    raw = {"data": {"datasets": [{"name": "a", "path": "${MY_DATA:-/default}/a.jsonl"}]}}
    monkeypatch.delenv("MY_DATA", raising=False)
    assert load_config(write(tmp_path, raw)).data.datasets[0].path == "/default/a.jsonl"
    monkeypatch.setenv("MY_DATA", "/mine")
    assert load_config(write(tmp_path, raw)).data.datasets[0].path == "/mine/a.jsonl"
    raw["data"]["datasets"][0]["path"] = "${UNSET_VAR_XYZ}/a.jsonl"
    with pytest.raises(ConfigError, match="UNSET_VAR_XYZ is not set"):
        load_config(write(tmp_path, raw))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["data.seed=7"])
    out = save_resolved_config(cfg, tmp_path / "out")
    again = load_config(out)
    assert again == cfg and again.data.seed == 7


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "tiny.yaml", "gpu/opt-1.3b-350m.yaml", "gpu/llama2-7b-lora.yaml"])
def test_shipped_recipes_validate(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    assert cfg.ppo.responses_per_step % cfg.ppo.responses_per_update == 0  # mini-batches count responses


def test_a_key_written_twice_is_an_error_naming_key_and_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `sft:` section silently reset the first one's settings."""
    path = tmp_path / "dup.yaml"
    path.write_text("sft:\n  learning_rate: 3.0e-3\ndata:\n  datasets: [{name: d, path: x.jsonl}]\nsft:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"(?s)dup.yaml: .*duplicate key 'sft' \(first on line 1\).*line 5"):
        load_config(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  datasets: [{name: d, path: x.jsonl}]\nsft:\n  epochs: 1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'epochs' \(first on line 4\)"):
        load_config(nested)


def test_a_utf8_bom_in_the_config_is_fine(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + b"data:\n  datasets: [{name: d, path: x.jsonl}]\nsft:\n  epochs: 2\n")
    assert load_config(path).sft.epochs == 2


def test_an_override_below_a_single_value_is_an_error(tmp_path):
    raw = {**MINIMAL, "sft": {"learning_rate": 1e-5}}
    with pytest.raises(ConfigError, match=r"sft.learning_rate is a single value \(1e-05\), it has no key 'x'"):
        load_config(write(tmp_path, raw), ["sft.learning_rate.x=1"])


BAD_CONFIGS = REPO / "tests" / "data" / "bad_configs"


@pytest.mark.parametrize("name, said", [
    ("duplicate_section.yaml", "duplicate key 'sft' (first on line 1)"),
    ("duplicate_key.yaml", "duplicate key 'steps' (first on line 4)"),
    ("not_a_mapping.yaml", "the top level must be a mapping"),
    ("unknown_key.yaml", "sft.learning_rat: unknown key"),
    ("bad_value.yaml", "sft.learning_rate: Input should be greater than 0"),
    ("invalid_yaml.yaml", "not valid YAML"),
    ("non_utf8.yaml", "not UTF-8 text"),
    ("unset_env_var.yaml", "environment variable RLHFKIT_TEST_SURELY_UNSET is not set"),
    ("bad_choice.yaml", "sft.resume: Input should be 'auto', 'never' or 'force'"),
])
def test_bad_config_corpus(name, said):
    with pytest.raises(ConfigError) as err:
        load_config(BAD_CONFIGS / name)
    assert str(err.value).startswith(str(BAD_CONFIGS / name)) and said in str(err.value), str(err.value)


def test_another_models_section_does_not_inherit_model_tokenizer(tmp_path):
    """With model.tokenizer set, the RM (or a stage output) must load its own tokenizer: inheriting it hid a
    tokenizer mismatch between actor and RM."""
    from rlhfkit.models.configs import model_config_for

    cfg = load_config(write(tmp_path, {**MINIMAL, "model": {"name_or_path": "base", "tokenizer": "tok", "revision": "v1"}}))
    assert model_config_for(cfg, None).tokenizer == "tok"
    other = model_config_for(cfg, "org/reward-model")
    assert other.name_or_path == "org/reward-model" and other.tokenizer is None and other.revision is None
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "tokenizer.json").write_text("{}")
    assert model_config_for(cfg, str(tmp_path / "rm")).tokenizer is None
    (tmp_path / "bare").mkdir()  # a model dir without a tokenizer uses the configured one
    assert model_config_for(cfg, str(tmp_path / "bare")).tokenizer == "tok"
