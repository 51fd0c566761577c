"""A text reward whose optimum is known, for the critic-free RL tests (a `python` reward source).

share_of_a: the share of the response's non-space characters that are "a" or "A". A random tiny policy
scores a few percent; responses made of "a"-heavy tokens score up to 1.
"""


def share_of_a(prompts, responses, metadata):
    out = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c in "aA" for c in chars) / max(len(chars), 1))
    return out
