"""Rewards computed from text: verifiers (verifiers.py), reward sources built from ppo.reward.sources or
eval.rewards (sources.py), the client of a remote reward server (remote.py) and `rlhfkit serve-reward`
(server.py). The trained reward model on token ids is the trainer's own `model` source."""
