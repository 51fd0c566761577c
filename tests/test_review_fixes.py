"""Fixes from the PPO/DPO/RM review: equal forward counts under ZeRO-3, score normalisation on the policy's
own samples, the critic in the normalised scale, truncated sampling, DPO without dropout, PPO logging, and
no non-finite weights published.

Run as a script under torchrun it is the 2-process half of the ZeRO-3 RM-statistics test:
    python -m torch.distributed.run --nproc_per_node 2 tests/test_review_fixes.py OUT.json
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from rlhfkit.engine.sharding import equal_count_batches
from test_training import ENV, _free_port


# --- equal forward counts on every rank ----------------------------------------------------------

def test_every_rank_gets_as_many_batches_as_the_largest_share_needs():
    # 17 rows over 2 ranks in micro-batches of 8: rank 0 has 9 rows (2 batches), rank 1 has 8 (1 batch)
    r0, r1 = (equal_count_batches(17, rank, 2, 8) for rank in (0, 1))
    assert len(r0) == len(r1) == 2
    assert [rows.tolist() for rows, keep in r0 if keep] == [list(range(8)), [8]]
    assert [rows.tolist() for rows, keep in r1 if keep] == [list(range(9, 17))]
    assert r1[1][1] is False and len(r1[1][0]) == 1  # a stand-in row, its result dropped
    assert all(len(b) == 1 for b in (equal_count_batches(100, r, 4, 8, max_batches=1) for r in range(4)))
    assert equal_count_batches(0, 0, 2, 8) == []


class PairRows:
    """n preference rows of different lengths, as a Blend serves them."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.rows = [{"chosen_ids": rng.integers(10, 900, 6 + i % 5), "rejected_ids": rng.integers(10, 900, 4 + i % 3),
                      "prompt_len": 3} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def row(self, i: int) -> dict:
        return self.rows[i]


def rm_score_stats(zero_stage: int) -> tuple[float, float]:
    """The RM stage's score statistics pass over 17 pairs, micro-batch 8, on a tiny reward model."""
    from rlhfkit.config import ModelConfig, RewardConfig
    from rlhfkit.engine.backend import TrainEngine, param_groups
    from rlhfkit.models.loading import resolve_model_dir
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.train.reward import score_stats

    torch.manual_seed(0)
    model = RewardModel.from_pretrained(resolve_model_dir("tiny-random", ModelConfig(name_or_path="tiny-random")))
    t = RewardConfig(zero_stage=zero_stage, micro_batch_size=8, dtype="float32")
    engine = TrainEngine(model, t, 10, param_groups(model, 1e-5, 0.0))
    return score_stats(engine, PairRows(17), pad_id=2, micro=8)


def test_rm_score_stats_on_two_zero3_processes_do_not_hang_and_match_one_process(tmp_path):
    """17 rows, 2 ranks, micro-batch 8: one rank has a forward fewer, which hung ZeRO-3's parameter gathers."""
    out = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(REPO / "tests" / "test_review_fixes.py"), str(out)]
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers
        p.communicate()
        pytest.fail("the 2-process ZeRO-3 score statistics pass hung")
    assert p.returncode == 0, log[-4000:]
    two = json.loads(out.read_text())
    one = rm_score_stats(zero_stage=0)
    assert two == pytest.approx(list(one), abs=1e-5)


if __name__ == "__main__":
    from rlhfkit.engine import distributed as D

    stats = rm_score_stats(zero_stage=3)
    if D.is_main():
        with open(sys.argv[1], "w") as f:
            json.dump(list(stats), f)
    D.barrier()
