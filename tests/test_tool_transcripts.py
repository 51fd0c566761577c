"""scripts/gsm8k_tool_transcripts.py: GSM8K's calculator annotations as tool-use SFT transcripts whose text and
token ids are what configs/gsm8k-tools.yaml's episodes show the model (real calculator, real SmolLM2 tokenizer)."""

import gzip
import importlib.util
import json

import yaml

from conftest import REPO, write_jsonl
from rlhfkit.agents.calls import parse_tool_calls, ToolCall
from rlhfkit.agents.episode import EpisodeTemplate
from rlhfkit.agents.tools import load_tools
from rlhfkit.config import load_config
from rlhfkit.data.records import to_example
from rlhfkit.data.render import Renderer
from rlhfkit.models import load_tokenizer
from rlhfkit.rollout.sampling import sampling_for

RECIPE = REPO / "configs" / "gsm8k-tools.yaml"
_spec = importlib.util.spec_from_file_location("gsm8k_tool_transcripts", REPO / "scripts" / "gsm8k_tool_transcripts.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

TWO_CALLS = {"id": "two", "prompt": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
             "clips in May. How many clips did Natalia sell altogether in April and May?",
             "response": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                         "altogether in April and May.\n#### 72", "final_answer": "72"}
GLUED = {"id": "glued", "prompt": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
         "babysitting. How much did she earn?",
         "response": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 0.2", "final_answer": "0.2"}
DROPPED = [
    {"id": "three", "prompt": "What is (1 + 2) * 3 - 4?",
     "response": "1+2 = <<1+2=3>>3, 3*3 = <<3*3=9>>9, 9-4 = <<9-4=5>>5.\n#### 5"},           # too_many_calls
    {"id": "wrong", "prompt": "Split 10 apples among 3 people.",
     "response": "Each gets 10/3 = <<10/3=3.33>>3.33 apples.\n#### 3.33"},                   # result_differs
    {"id": "refused", "prompt": "What is 3 times 4?",
     "response": "It is 3x4 = <<3x4=12>>12.\n#### 12"},                                      # calculator_tool_error
    {"id": "none", "prompt": "How many legs has a cat?", "response": "A cat has four legs.\n#### 4"},  # no_calls
    {"id": "rl", "prompt": "  What is 6 times 7? ", "response": "6*7 = <<6*7=42>>42.\n#### 42"},   # rl_question
]
RL_PROMPTS = [{"id": f"rl{i}", "prompt": p, "response": "#### 1", "final_answer": "1"}
              for i, p in enumerate(["What is 6 times 7?", "What is 2 plus 2?"])]


def setup(tmp_path):
    """The recipe with its phase-3 dataset pointed at RL_PROMPTS; GSM8K-like records to turn into transcripts."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"]["datasets"] = [{"name": "gsm8k_train", "path": str(write_jsonl(tmp_path / "rl.jsonl", RL_PROMPTS)),
                                "format": "sft", "phases": [3], "max_records": 2000}]
    raw["data"]["cache_dir"] = str(tmp_path / "cache")
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(raw))
    source = write_jsonl(tmp_path / "gsm.jsonl", [TWO_CALLS, *DROPPED, GLUED])
    return config, source


def make(tmp_path, capsys, *extra) -> tuple[dict, str, object]:
    config, source = setup(tmp_path)
    out = tmp_path / "out" / "transcripts.jsonl.gz"
    assert script.main(["--config", str(config), "--source", str(source), "--out", str(out), *extra]) == 0
    with gzip.open(out, "rt") as f:
        records = {r["id"]: r["messages"] for r in map(json.loads, f)}
    return records, capsys.readouterr().out, load_config(config)


def test_each_annotation_is_a_calculator_call_ending_its_turn_and_the_tool_reply_follows(tmp_path, capsys):
    records, printed, _ = make(tmp_path, capsys)
    # one record per assistant turn; the dropped questions counted by reason
    assert list(records) == ["two-turn1", "two-turn2", "two-turn3", "glued-turn1", "glued-turn2"]
    for why in ("'kept': 2", "'too_many_calls': 1", "'result_differs': 1", "'calculator_tool_error': 1",
                "'no_calls': 1", "'rl_question': 1"):
        assert why in printed
    full = records["two-turn3"]
    assert [m["role"] for m in full] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert full[1] == {"role": "user", "content": TWO_CALLS["prompt"]}
    assert full[2]["content"] == ('Natalia sold 48/2 =\n<tool_call>\n{"name": "calculator", "arguments": '
                                  '{"expression": "48/2"}}\n</tool_call>')
    assert full[3] == {"role": "tool", "name": "calculator", "content": "24"}  # the runner's tool message
    assert full[4]["content"].startswith("24 clips in May.\nNatalia sold 48+24 =\n<tool_call>")
    assert parse_tool_calls(full[4]["content"]) == [ToolCall("calculator", {"expression": "48+24"})]
    assert full[5]["content"] == "72"
    assert full[6]["content"] == "72 clips altogether in April and May.\n#### 72"
    # each record is the conversation up to its own assistant turn
    assert records["two-turn1"] == full[:3] and records["two-turn2"] == full[:5]
    # a word glued to the annotation goes on in the next turn
    assert records["glued-turn1"][2]["content"].startswith("Weng earns 12/60 =\n<tool_call>")
    assert records["glued-turn2"][-1]["content"] == "$0.2 per minute.\n#### 0.2"


def test_max_calls_keeps_shorter_questions_and_must_fit_the_episodes_turns(tmp_path, capsys):
    records, printed, _ = make(tmp_path, capsys, "--max-calls", "1")
    assert list(records) == ["glued-turn1", "glued-turn2"] and "'too_many_calls': 2" in printed
    config, source = setup(tmp_path)
    assert script.main(["--config", str(config), "--source", str(source), "--out", str(tmp_path / "x.jsonl"),
                        "--max-calls", "3"]) == 1
    assert "--max-calls 3: must be 1 to ppo.max_turns - 1 = 2" in capsys.readouterr().err


def episode_parts(cfg):
    """The recipe's tokenizer, its data stage's renderer and the episode template RL builds (trainer.py's)."""
    tok = load_tokenizer(cfg.model)
    tools = load_tools(cfg.ppo.tools, "ppo.tools")
    _, stop_ids = sampling_for(cfg.ppo.sampling, tok)
    template = EpisodeTemplate(tok, [t.schema for t in tools.values()], cfg.data.system_prompt, stop_ids)
    return tok, Renderer(tok, cfg.data), template


def test_the_sft_token_ids_are_the_episodes_ids(tmp_path, capsys):
    """Every record, read (records.to_example), rendered and tokenized as the SFT data stage does, has as its prompt
    the episode's ids up to that turn: the described RL prompt of the same question, then each earlier turn as SFT
    teaches the model to sample it (its response ids and EOS) and what the episode adds after it (the tool's
    reply, the next generation prompt). The last record's whole sequence is the episode's."""
    records, _, cfg = make(tmp_path, capsys)
    tok, renderer, template = episode_parts(cfg)
    for question in ("two", "glued"):
        names = sorted(k for k in records if k.startswith(question + "-"))
        turns = [to_example({"id": k, "messages": records[k]}, "sft", k, i) for i, k in enumerate(names)]
        # the system message is the one the episode prompt has, to the character
        rl_prompt = renderer.encode_prompts([renderer.prompt_text(turns[0].prompt[1:])])[0]  # phase 3's, as prepared
        episode = template.prompt(rl_prompt)
        assert tok.decode(episode) == tok.apply_chat_template(records[names[0]][:2], tokenize=False,
                                                              add_generation_prompt=True)
        for k, ex in enumerate(turns):
            prompt = renderer.encode_prompts([renderer.prompt_text(ex.prompt)])[0]
            assert prompt == episode, f"{question} turn {k + 1}: SFT prompt ids differ from the episode's"
            response = renderer.encode_responses([ex.chosen])[0] + [renderer.eos_id]
            episode = episode + response
            if k + 1 < len(turns):
                tool_reply = records[names[k + 1]][len(ex.prompt) + 1]
                episode += template.after_turn([tool_reply], renderer.eos_id)
        assert prompt + response == episode
