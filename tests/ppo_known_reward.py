"""A reward whose optimum is known, as a real reward module PPO calls like any RM, and a runner for it.

    python tests/ppo_known_reward.py CONFIG [overrides...]
"""

import sys

import torch
from torch import nn

TARGET = (100, 200)  # token ids; a random tiny policy samples ~10% of its tokens from here


class TargetTokenReward(nn.Module):
    """Score = the fraction of response tokens whose id lies in TARGET (1.0 is the best a policy can do)."""

    def __init__(self, lo: int = TARGET[0], hi: int = TARGET[1]):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.register_buffer("unused", torch.zeros(1))  # something for .to(dtype) to move

    def forward(self, input_ids, lengths, prompt_lens):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        response = (pos >= prompt_lens[:, None]) & (pos < lengths[:, None])
        hit = (input_ids >= self.lo) & (input_ids < self.hi) & response
        return hit.sum(1).float() / response.sum(1).clamp(min=1)


if __name__ == "__main__":
    from rlhfkit.cli import _leave_process_group
    from rlhfkit.config import load_config
    from rlhfkit.train.ppo.trainer import run_ppo

    cfg = load_config(sys.argv[1], sys.argv[2:])
    run_ppo(cfg, show_progress=False, reward_model=TargetTokenReward())
    _leave_process_group()
