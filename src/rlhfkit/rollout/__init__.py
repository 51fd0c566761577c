"""What every RL algorithm and `rlhfkit eval` share: sampling rollouts from a policy (sampling.py) and
scoring them with frozen models (scoring.py). No stage imports another stage; they all import this."""
