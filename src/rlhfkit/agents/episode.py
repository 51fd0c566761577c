"""An episode as token ids: the ids the model sampled, and between its turns the ids of what tools and the
environment added.

Nothing is re-tokenised between turns: decoding the model's turn and encoding it again can give other ids
(" answer" sampled as " ans" + "wer" comes back as one token), and the log-probs, KL and loss must be of the
ids that were sampled. So the model's ids are kept as they came, and only the text that follows its turn is
encoded: the rest of the template's end of turn, the new messages, the next generation prompt. Only the
model's own ids are marked for the loss; the rest is context.
"""

from __future__ import annotations

# a conversation whose rendering marks where an assistant message's content ends
_USER, _ASSISTANT = "rlhfkit-probe-user", "rlhfkit-probe-assistant"
_PROBE = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]


class EpisodeTokens:
    """ids: the prompt, then each model turn and each addition in order; own[i]: ids[i] was sampled by the model
    (the loss, KL and advantages cover these only); prompt_len: how many ids the prompt has."""

    def __init__(self, prompt_ids: list[int]):
        self.ids, self.own, self.prompt_len = list(prompt_ids), [False] * len(prompt_ids), len(prompt_ids)

    def add_sampled(self, ids: list[int]) -> None:
        self.ids += ids
        self.own += [True] * len(ids)

    def add_context(self, ids: list[int]) -> None:
        self.ids += ids
        self.own += [False] * len(ids)


def continuation_ids(tokenizer, messages: list[dict], turn_ended_with: str = "", tools: list[dict] | None = None
                     ) -> list[int]:
    """The ids to append after a finished model turn so that the model goes on: the text the chat template
    writes after an assistant message's content, then `messages` (tool results, the environment's answer),
    then the generation prompt. turn_ended_with: the text of what the model's turn ended with that the
    template writes too (its end-of-turn token, e.g. "<|im_end|>"), left out so it is not there twice; "" when
    the turn stopped before it. tools: the schemas passed to the template (None for none).

    Rendered around a fixed probe conversation, so the model's own text is never encoded. ValueError where the
    template renders the probe differently once more messages follow (it cannot be continued this way) or
    does not write `turn_ended_with` after the content."""
    kwargs = {"tools": tools} if tools else {}
    base = tokenizer.apply_chat_template(_PROBE, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(_PROBE + messages, tokenize=False, add_generation_prompt=True, **kwargs)
    at = base.rfind(_ASSISTANT)
    end = at + len(_ASSISTANT)
    if at < 0 or full[:end] != base[:end]:
        raise ValueError("the chat template renders an assistant turn differently when messages follow it, so a "
                         "conversation cannot be continued by appending ids; use a template that renders earlier "
                         "turns the same way whatever follows")
    text = full[end:]
    if not text.startswith(turn_ended_with):
        raise ValueError(f"the chat template writes {text[:40]!r} after an assistant message, not "
                         f"{turn_ended_with!r}, the end the model's turn had")
    return tokenizer(text[len(turn_ended_with):], add_special_tokens=False)["input_ids"]
