"""Environments: loading by name, the built-in guessing game, and every failure as an EpisodeError that names
the environment and the episode."""

import textwrap

import pytest

from rlhfkit.agents.environments import EnvironmentEpisode, EpisodeError, GuessNumber, load_environment
from rlhfkit.errors import ConfigError, RlhfkitError

ENVS_PY = textwrap.dedent('''
    class Countdown:
        """Say the numbers from metadata["start"] down to 1, one per turn."""

        def reset(self, metadata):
            self.next = metadata["start"]
            return [{"role": "user", "content": f"Count down from {self.next}."}]

        def step(self, assistant_message):
            right = assistant_message["content"].strip() == str(self.next)
            self.next -= 1
            return [{"role": "user", "content": "ok" if right else "wrong"}], float(right), self.next == 0

    class Broken:
        def reset(self, metadata):
            return [{"role": "user", "content": "go"}]

        def step(self, assistant_message):
            raise KeyError("state")

    class Sloppy:
        def __init__(self):
            self.returns = None

        def reset(self, metadata):
            return metadata["reset_returns"]

        def step(self, assistant_message):
            return self.returns

    class NoStep:
        def reset(self, metadata):
            return []

    class NeedsArgs:
        def __init__(self, size):
            self.size = size

        def reset(self, metadata):
            return [{"role": "user", "content": "hi"}]

        def step(self, assistant_message):
            return [], 0.0, True

    def not_a_class():
        return None
''')


@pytest.fixture
def envs_file(tmp_path):
    path = tmp_path / "my_envs.py"
    path.write_text(ENVS_PY)
    return path


def say(text):
    return {"role": "assistant", "content": text}


def test_an_episode_from_a_file_class(envs_file):
    cls = load_environment(f"{envs_file}:Countdown", "ppo.environment")
    episode = EnvironmentEpisode(cls, "my_envs.py:Countdown", "prompt 0, sample 0")
    assert episode.reset({"start": 2}) == [{"role": "user", "content": "Count down from 2."}]
    assert episode.step(say("2")) == ([{"role": "user", "content": "ok"}], 1.0, False)
    assert episode.step(say("0")) == ([{"role": "user", "content": "wrong"}], 0.0, True)
    assert (episode.steps, episode.reward, episode.done) == (2, 1.0, True)
    with pytest.raises(RuntimeError, match="is over"):
        episode.step(say("0"))


def test_one_instance_per_episode(envs_file):
    cls = load_environment(f"{envs_file}:Countdown", "ppo.environment")
    a, b = EnvironmentEpisode(cls, "countdown", "0"), EnvironmentEpisode(cls, "countdown", "1")
    a.reset({"start": 3})
    b.reset({"start": 1})
    assert a.step(say("3"))[1:] == (1.0, False) and b.step(say("1"))[1:] == (1.0, True)


def test_guess_number():
    cls = load_environment("guess_number", "ppo.environment")
    assert cls is GuessNumber
    episode = EnvironmentEpisode(cls, "guess_number", "0")
    (opening,) = episode.reset({"secret": 37, "high": 50, "max_guesses": 3})
    assert opening["role"] == "user" and "from 1 to 50" in opening["content"] and "3 guesses" in opening["content"]
    assert episode.step(say("I guess 20"))[0][0]["content"] == "Higher. 2 guesses left."
    assert episode.step(say("no idea"))[0][0]["content"] == "That is not a number. 1 guess left."
    assert episode.step(say("Then 37.")) == ([], 1.0, True)
    lost = EnvironmentEpisode(cls, "guess_number", "1")
    lost.reset({"secret": 5, "max_guesses": 1})
    assert lost.step(say("9")) == ([{"role": "user", "content": "No guesses left; it was 5."}], 0.0, True)


def test_guess_number_without_a_secret_names_the_field():
    episode = EnvironmentEpisode(GuessNumber, "guess_number", "prompt 4, sample 1")
    with pytest.raises(EpisodeError) as e:
        episode.reset({"prompt_id": "a"})
    assert str(e.value) == ("environment 'guess_number', episode prompt 4, sample 1, reset: raised ValueError: the "
                            "prompt record has no field 'secret' (the number to guess); its fields: ['prompt_id']")


def test_an_environment_that_raises_names_itself_the_episode_and_the_step(envs_file):
    episode = EnvironmentEpisode(load_environment(f"{envs_file}:Broken", "ppo.environment"), "my_envs.py:Broken",
                                 "prompt 7, sample 2")
    episode.reset({})
    with pytest.raises(EpisodeError) as e:
        episode.step(say("hi"))
    assert isinstance(e.value, RlhfkitError)  # the CLI prints it without a traceback
    assert str(e.value) == "environment 'my_envs.py:Broken', episode prompt 7, sample 2, step 1: raised KeyError: 'state'"


def test_an_environment_that_cannot_be_made_is_an_episode_error(envs_file):
    cls = load_environment(f"{envs_file}:NeedsArgs", "ppo.environment")
    with pytest.raises(EpisodeError, match=r"episode 0, creating it: raised TypeError: .*size"):
        EnvironmentEpisode(cls, "needs_args", "0")


@pytest.mark.parametrize("reset_returns, problem", [
    ([], "it returned an empty list"),
    ("hello", "got 'hello'"),
    ([{"role": "user"}], "message 0 is {'role': 'user'}"),
])
def test_bad_reset_values(envs_file, reset_returns, problem):
    episode = EnvironmentEpisode(load_environment(f"{envs_file}:Sloppy", "e"), "sloppy", "0")
    with pytest.raises(EpisodeError, match="reset: must return the opening messages") as e:
        episode.reset({"reset_returns": reset_returns})
    assert problem in str(e.value)


@pytest.mark.parametrize("returns, problem", [
    (([], 1.0), "must return (messages, reward, done), returned ([], 1.0)"),
    (("no", 1.0, True), "returned messages that are not a list"),
    (([], "high", True), "a reward that is not a number: 'high'"),
    (([], float("nan"), True), "a non-finite reward (nan)"),
    (([], 1.0, "yes"), "`done` that is not a boolean: 'yes'"),
])
def test_bad_step_values(envs_file, returns, problem):
    episode = EnvironmentEpisode(load_environment(f"{envs_file}:Sloppy", "e"), "sloppy", "3")
    episode.reset({"reset_returns": [{"role": "user", "content": "go"}]})
    episode._env.returns = returns
    with pytest.raises(EpisodeError) as e:
        episode.step(say("x"))
    assert str(e.value).startswith("environment 'sloppy', episode 3, step 1: ") and problem in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
    ("missing.py:Env", "not found"),
    ("{file}:Nothing", "has no function 'Nothing'"),
    ("{file}:not_a_class", "is not a class"),
    ("{file}:NoStep", "has no step method"),
    ("guess_numbr", "is not a built-in environment"),
])
def test_bad_environment_names_name_the_setting(envs_file, tmp_path, spec, message):
    with pytest.raises(ConfigError) as e:
        load_environment(spec.format(file=envs_file), "ppo.environment", base_dir=tmp_path)
    assert str(e.value).startswith("ppo.environment: ") and message in str(e.value)
