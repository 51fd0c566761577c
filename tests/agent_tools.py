"""Tools and rewards for the multi-turn RL tests (named `tests/agent_tools.py:<function>` in a config).

`lookup` is the only way to the secret word, and `used_lookup` rewards an episode in which the secret appears:
the model earns the reward by calling the tool and by nothing else (the tiny model cannot spell the secret)."""

import time

SECRET = "zebra-quartz-7421"


def lookup() -> str:
    """Look the secret word up."""
    return SECRET


def slow(seconds: float) -> str:
    """Wait, then say so.

    Args:
        seconds: How long to wait.
    """
    time.sleep(seconds)
    return "done"


def broken() -> str:
    """Always fails."""
    raise RuntimeError("this tool is broken")


def used_lookup(prompts, responses, metadata):
    return [float(SECRET in r) for r in responses]


class FailingEnvironment:
    """Two steps per episode, 0.5 reward each; the 25th episode made in a process raises in its second step."""

    episodes = 0

    def reset(self, metadata):
        type(self).episodes += 1
        self.number, self.steps = type(self).episodes, 0
        return [{"role": "user", "content": "Say something."}]

    def step(self, assistant_message):
        self.steps += 1
        if self.steps == 2 and self.number == 25:
            raise KeyError("door")
        return [{"role": "user", "content": "Once more."}], 0.5, self.steps == 2


class NarratingEnvironment(FailingEnvironment):
    """FailingEnvironment's two steps, each answered with a user message, except the 25th episode's first: a
    message with the role 'narrator', which a chat template that knows only system, user and assistant refuses."""

    episodes = 0

    def step(self, assistant_message):
        self.steps += 1
        role = "narrator" if self.steps == 1 and self.number == 25 else "user"
        return [{"role": role, "content": "Once more."}], 0.5, self.steps == 2
