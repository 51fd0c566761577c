"""Python reward functions for tests/test_rewards.py: fn(prompts, responses, metadata) -> one float each."""

import math


def length(prompts, responses, metadata):
    """The response's length in characters."""
    return [float(len(r)) for r in responses]


def says_yes(prompts, responses, metadata):
    return [1.0 if "yes" in r.lower() else 0.0 for r in responses]


def one_short(prompts, responses, metadata):
    return [1.0] * (len(responses) - 1)


def not_a_number(prompts, responses, metadata):
    return [math.nan] + [0.0] * (len(responses) - 1)


def broken(prompts, responses, metadata):
    raise KeyError("score_me")


def text_values(prompts, responses, metadata):
    return ["high"] * len(responses)


NOT_CALLABLE = 3
