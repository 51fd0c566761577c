"""Packed SFT and RM batches (train/packing.py) on the tiny random model, in fp32: the same per-sequence loss and
the same gradients as padded batches, and no sequence attending across its boundary (a pair's rejected
sequence not to its chosen one either, beyond the prefix they share).

Tolerances (fp32): per-sequence losses and scores within 1e-5 absolute, gradients within 1e-5 relative to
the largest gradient entry of each parameter: a packed row runs the same sequences through matmuls of other
shapes, so sums are taken in another order; nothing else differs."""

import numpy as np
import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models import load_causal_lm, resolve_model_dir
from rlhfkit.train.batching import collate_pairs, collate_sft
from rlhfkit.train.common import TokenLogprobLM
from rlhfkit.train.losses import backbone_and_head, bradley_terry_loss
from rlhfkit.train.packing import (collate_pairs_packed, collate_sft_packed, first_fit, pack, packed_inputs,
                                   require_isolated_packing, shared_prefix_len)
from rlhfkit.train.reward import PackableRewardModel, pair_scores
from rlhfkit.train.sft import sft_batch_loss

PAD = 2


def sft_rows(lengths, prompt_lens, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 900, n), "prompt_len": p} for n, p in zip(lengths, prompt_lens)]


def pair_rows(chosen, rejected, seed=0):
    rng = np.random.default_rng(seed)
    return [{"chosen_ids": rng.integers(3, 900, c), "rejected_ids": rng.integers(3, 900, r), "prompt_len": 2}
            for c, r in zip(chosen, rejected)]


def prompted_pairs(prompts, chosen, rejected, seed=0):
    """Pairs whose two sequences start with the same prompt of the given length, then differ."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, c, r in zip(prompts, chosen, rejected):
        prompt = rng.integers(3, 900, p)
        rows.append({"chosen_ids": np.concatenate([prompt, rng.integers(3, 450, c)]),
                     "rejected_ids": np.concatenate([prompt, rng.integers(450, 900, r)]), "prompt_len": p})
    return rows


def assert_same_grads(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        scale = max(float(p.grad.abs().max()), 1e-12)
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5 * scale, msg=name)


def test_first_fit_packs_longest_first_into_rows_no_wider_than_the_longest():
    assert first_fit([5, 3, 2, 4, 1], 5) == [[0], [3, 4], [1, 2]]
    ids, positions, where = pack([np.array([7, 8, 9]), np.array([4, 5]), np.array([6])], PAD)
    assert ids.tolist() == [[7, 8, 9], [4, 5, 6]]  # 3 rows of 3 padded would be 9 positions, 3 of them padding
    assert positions.tolist() == [[0, 1, 2], [0, 1, 0]]  # restarting at every sequence
    assert where.tolist() == [[0, 0], [1, 0], [1, 2]]
    ids, positions, _ = pack([np.array([7, 8, 9, 10]), np.array([4])], PAD)
    assert ids.tolist() == [[7, 8, 9, 10], [4, PAD, PAD, PAD]] and positions[1].tolist() == [0, 0, 1, 2]


def test_packed_sft_batch_marks_the_same_targets():
    rows = sft_rows([9, 4, 3, 6], [5, 2, 1, 3])
    packed = collate_sft_packed(rows, PAD)
    padded = collate_sft(rows, PAD)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum() == 4 + 2 + 2 + 3
    assert sorted(packed["input_ids"][packed["loss_mask"]].tolist()) == sorted(padded["input_ids"][padded["loss_mask"]].tolist())
    every_token = collate_sft_packed(rows, PAD, response_only=False)
    assert every_token["loss_mask"].sum() == 8 + 3 + 2 + 5


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return TokenLogprobLM(load_causal_lm(ModelConfig(name_or_path="tiny-random"), dtype="float32")).eval()


def per_sequence_nll(lm, batch, seqs, starts):
    """Each sequence's summed NLL, from a padded or packed batch (its tokens' log-probs read back in place)."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    if "position_ids" in batch:
        logprobs, _ = lm(ids, None, mask, position_ids=batch["position_ids"])
        _, _, where = pack(seqs, PAD)
    else:
        logprobs, _ = lm(ids, batch["lengths"], mask)
        where = torch.stack([torch.arange(len(seqs)), torch.zeros(len(seqs), dtype=torch.long)], 1)
    grid = torch.zeros(ids.shape)
    grid[:, 1:][mask[:, 1:]] = logprobs.detach()
    return [-float(grid[r, c + s:c + len(seq)].sum()) for (r, c), seq, s in zip(where.tolist(), seqs, starts)]


def test_packed_sft_gives_the_same_per_sequence_loss_and_gradients(lm):
    rows = sft_rows([17, 5, 9, 30, 3, 12], [6, 2, 4, 10, 1, 5])
    seqs, starts = [r["input_ids"] for r in rows], [r["prompt_len"] for r in rows]
    padded, packed = collate_sft(rows, PAD), collate_sft_packed(rows, PAD)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    with torch.no_grad():
        alone = per_sequence_nll(lm, padded, seqs, starts)
        together = per_sequence_nll(lm, packed, seqs, starts)
    assert together == pytest.approx(alone, abs=1e-5)

    twin = TokenLogprobLM(load_causal_lm(ModelConfig(name_or_path="tiny-random"), dtype="float32")).eval()
    twin.load_state_dict(lm.state_dict())
    lm.zero_grad()
    loss_padded = sft_batch_loss(lm, padded, "cpu")
    loss_padded.backward()
    loss_packed = sft_batch_loss(twin, packed, "cpu")
    loss_packed.backward()
    assert loss_packed.item() == pytest.approx(loss_padded.item(), abs=1e-4)
    assert_same_grads(lm, twin)


def test_changing_one_packed_sequence_leaves_the_others_logits_unchanged(lm):
    backbone, head = backbone_and_head(lm.lm)
    seqs = [np.arange(10, 22), np.arange(40, 47), np.arange(60, 64)]
    ids, positions, where = pack(seqs, PAD)
    assert where[1, 0] == where[2, 0]  # sequences 1 and 2 share a row
    row, col = where[2].tolist()
    changed = ids.clone()
    changed[row, where[1, 1]:where[1, 1] + len(seqs[1])] = torch.arange(100, 100 + len(seqs[1]))

    def logits(batch_ids, **layout):
        with torch.no_grad():
            return head(backbone(input_ids=batch_ids, **layout).last_hidden_state)[row, col:col + len(seqs[2])]

    torch.testing.assert_close(logits(changed, **packed_inputs(positions)), logits(ids, **packed_inputs(positions)),
                               rtol=0, atol=1e-6)
    # the same change is seen by a plain causal forward over the row: the comparison above can see a leak
    assert not torch.allclose(logits(changed), logits(ids), atol=1e-3)


def assert_packed_rm_matches_padded(rows, packed):
    """The packed batch of `rows` gives the padded batch's scores, Bradley–Terry loss gradients included."""
    torch.manual_seed(0)
    path = resolve_model_dir("tiny-random")
    padded_rm = PackableRewardModel.from_pretrained(path).eval()
    packed_rm = PackableRewardModel.from_pretrained(path).eval()
    packed_rm.load_state_dict(padded_rm.state_dict())
    chosen, rejected = pair_scores(padded_rm, collate_pairs(rows, PAD), "cpu")
    chosen_p, rejected_p = pair_scores(packed_rm, packed, "cpu")
    torch.testing.assert_close(chosen_p, chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected_p, rejected, rtol=0, atol=1e-5)
    bradley_terry_loss(chosen, rejected, 0.0, 0.01).backward()
    bradley_terry_loss(chosen_p, rejected_p, 0.0, 0.01).backward()
    assert_same_grads(padded_rm, packed_rm)


def test_packed_rm_gives_the_same_scores_loss_and_gradients():
    rows = pair_rows([20, 8, 14, 31], [5, 26, 3, 9])  # nothing shared: each pair's sequences differ from the start
    packed = collate_pairs_packed(rows, PAD)
    assert packed["input_ids"].numel() < collate_pairs(rows, PAD)["input_ids"].numel()
    assert_packed_rm_matches_padded(rows, packed)


def test_shared_prefix_leaves_each_sequence_a_token_of_its_own():
    assert shared_prefix_len(np.array([1, 2, 3, 4]), np.array([1, 2, 5])) == 2
    assert shared_prefix_len(np.array([1, 2, 3, 4]), np.array([1, 2])) == 1  # one is the other's start
    assert shared_prefix_len(np.array([1, 2, 3]), np.array([1, 2, 3])) == 2
    assert shared_prefix_len(np.array([7]), np.array([8, 9])) == 0


def test_packed_pairs_compute_their_shared_prompt_once_with_the_same_scores_and_gradients():
    rows = prompted_pairs([12, 30, 5, 20, 9], [7, 3, 15, 1, 4], [2, 11, 6, 1, 9])
    rows.append({"chosen_ids": np.array([5, 6, 7, 8, 9]), "rejected_ids": np.array([5, 6]), "prompt_len": 1})
    padded, shared = collate_pairs(rows, PAD), collate_pairs_packed(rows, PAD)
    whole = collate_pairs_packed(rows, PAD, share_prefix=False)
    lengths = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    prompts = sum(r["prompt_len"] for r in rows)
    assert shared["input_ids"].numel() < whole["input_ids"].numel() <= padded["input_ids"].numel()
    # the positions holding a token: each pair once, less the prompt it shares (the last pair: 1 token)
    filled = sum(int(shared["ends"][shared["ends"][:, 0] == r, 1].max()) + 1 for r in range(shared["input_ids"].shape[0]))
    assert filled == lengths - prompts
    assert_packed_rm_matches_padded(rows, shared)


def test_a_rejected_sequence_sees_the_shared_prompt_but_not_its_chosen_reply():
    torch.manual_seed(0)
    rm = PackableRewardModel.from_pretrained(resolve_model_dir("tiny-random")).eval()
    rows = prompted_pairs([14, 8, 6], [8, 4, 4], [6, 3, 3])  # units of 28, 15 and 13 positions
    assert collate_pairs_packed(rows, PAD)["ends"][:, 0].tolist() == [0, 1, 1, 0, 1, 1]  # pairs 1 and 2 share a row

    def scores(rows):
        with torch.no_grad():
            return torch.cat(pair_scores(rm, collate_pairs_packed(rows, PAD), "cpu"))  # chosen 0-2, rejected 3-5

    base = scores(rows)
    other_reply = list(rows)
    other_reply[1] = dict(rows[1], chosen_ids=np.concatenate([rows[1]["chosen_ids"][:8], np.arange(100, 104)]))
    changed = scores(other_reply)
    assert not torch.allclose(changed[1], base[1])  # pair 1's chosen reply changed, so did its score
    keep = [0, 2, 3, 4, 5]  # the others, pair 1's rejected reply and pair 2 beside it included, did not
    torch.testing.assert_close(changed[keep], base[keep], rtol=0, atol=1e-6)
    other_prompt = list(rows)
    other_prompt[1] = {k: v.copy() for k, v in rows[1].items() if k != "prompt_len"}
    other_prompt[1]["chosen_ids"][:3] = other_prompt[1]["rejected_ids"][:3] = [100, 101, 102]
    changed = scores(other_prompt)
    assert not torch.allclose(changed[4], base[4])  # pair 1's rejected reply reads the prompt it shares
    torch.testing.assert_close(changed[[2, 5]], base[[2, 5]], rtol=0, atol=1e-6)  # pair 2 does not


def test_packed_pairs_score_the_same_under_eager_attention():
    torch.manual_seed(0)
    path = resolve_model_dir("tiny-random")
    sdpa = PackableRewardModel.from_pretrained(path).eval()
    eager = PackableRewardModel.from_pretrained(path).eval()
    eager.load_state_dict(sdpa.state_dict())
    eager.backbone.set_attn_implementation("eager")
    require_isolated_packing(eager.backbone, "rm.packing", pairs=True)
    rows = prompted_pairs([12, 5], [7, 3], [2, 11])
    with torch.no_grad():
        padded = torch.cat(pair_scores(sdpa, collate_pairs(rows, PAD), "cpu"))
        packed = torch.cat(pair_scores(eager, collate_pairs_packed(rows, PAD), "cpu"))
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


class IgnoresMask(torch.nn.Module):
    """The tiny model's transformer called without the 4D attention mask it is given."""

    def __init__(self, backbone):
        super().__init__()
        self.inner, self.config = backbone, backbone.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache)


def test_a_model_that_ignores_the_pair_mask_is_refused():
    rm = PackableRewardModel.from_pretrained(resolve_model_dir("tiny-random"))
    require_isolated_packing(rm.backbone, "rm.packing", pairs=True)
    with pytest.raises(ConfigError, match=r"rm.packing: .*4D attention mask.*set rm.packing: false"):
        require_isolated_packing(IgnoresMask(rm.backbone), "rm.packing", pairs=True)


class IgnoresPositions(torch.nn.Module):
    """The tiny model's transformer called without the position_ids it is given: a model whose attention does
    not restart at a packed sequence's first position (as one with its own mask code might)."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone

    def forward(self, input_ids, position_ids=None, use_cache=None):
        return self.inner(input_ids=input_ids)


def test_a_model_that_attends_across_packed_sequences_is_refused(lm):
    backbone, _ = backbone_and_head(lm.lm)
    require_isolated_packing(backbone, "sft.packing")
    assert not backbone.training or lm.training
    with pytest.raises(ConfigError, match=r"sft.packing: .*attend to the one before it.*set sft.packing: false"):
        require_isolated_packing(IgnoresPositions(backbone), "sft.packing")


def varied_pairs(n: int):
    """Preference records whose prompts and replies vary in length, so packed rows hold several sequences."""
    return [{"id": f"v{i}", "prompt": f"Tell me fact {i}." + " Please." * (i % 5),
             "chosen": "Here it is: " + "a true fact, " * (1 + i % 7) + "done.", "rejected": "No." + " Never." * (i % 3)}
            for i in range(n)]


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_a_packed_stage_trains_as_the_padded_one(tmp_path, stage):
    """The stage itself (engine, micro-batches, eval) with and without packing: the same losses at every step,
    the same eval and the same final weights."""
    from safetensors.torch import load_file

    from conftest import make_config, write_jsonl
    from rlhfkit.config import RewardConfig, SFTConfig
    from rlhfkit.tracking import read_metrics
    from rlhfkit.train.reward import run_rm
    from rlhfkit.train.sft import run_sft

    if "packing" not in (SFTConfig if stage == "sft" else RewardConfig).model_fields:
        pytest.skip(f"config.py does not declare {stage}.packing yet")
    data = write_jsonl(tmp_path / "pairs.jsonl", varied_pairs(60))
    runs = {}
    for packing in (False, True):
        cfg = make_config(tmp_path / str(packing), [{"name": "d", "path": str(data)}])
        setattr(cfg, stage, getattr(cfg, stage).model_copy(update={
            "packing": packing, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 3,
            "learning_rate": 1e-3, "save_every": 0, "dropout": 0.0}))
        (run_sft if stage == "sft" else run_rm)(cfg, show_progress=False)
        out = tmp_path / str(packing) / "run" / stage
        metrics = read_metrics(out / "metrics.jsonl")
        runs[packing] = ([m["train/loss"] for m in metrics if "train/loss" in m],
                         [m["eval/loss"] for m in metrics if "eval/loss" in m],
                         load_file(next((out / "final").glob("*.safetensors"))))
    (losses, evals, weights), (losses_p, evals_p, weights_p) = runs[False], runs[True]
    assert len(losses) == 3 and losses_p == pytest.approx(losses, abs=1e-5)
    assert evals_p == pytest.approx(evals, abs=1e-5)
    for name, w in weights.items():
        torch.testing.assert_close(weights_p[name], w, rtol=0, atol=1e-5, msg=name)
