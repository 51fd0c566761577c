"""An episode as token ids: the ids the model sampled, and between its turns the ids of what tools and the
environment added.

Nothing is re-tokenised between turns: decoding the model's turn and encoding it again can give other ids
(" answer" sampled as " ans" + "wer" comes back as one token), and the log-probs, KL and loss must be of the
ids that were sampled. So the model's ids are kept as they came, and only the text that follows its turn is
encoded: the rest of the template's end of turn, the new messages, the next generation prompt. Only the
model's own ids are marked for the loss; the rest is context.
"""

from __future__ import annotations

from jinja2 import TemplateError

from .calls import template_takes_tools, tool_message, with_tool_instructions

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


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> str:
    """The chat template's text of `messages` (with `tools=` where given). A template that refuses them (jinja2's
    TemplateError: a role it does not take, raised with raise_exception, or its own syntax error) is a ValueError
    naming the template and the roles, as the other reasons an episode cannot be rendered are."""
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except TemplateError as e:
        roles = ", ".join(repr(m.get("role")) for m in messages)
        raise ValueError(f"the chat template of {tokenizer.name_or_path!r} refuses messages with the roles {roles}: "
                         f"{type(e).__name__}: {e}") from None


def continuation_ids(tokenizer, messages: list[dict], turn_ended_with: str = "", tools: list[dict] | None = None
                     ) -> list[int]:
    """The ids to append after a finished model turn so that the model goes on: the text the chat template
    writes after an assistant message's content, then `messages` (tool results, the environment's answer),
    then the generation prompt. turn_ended_with: the text of what the model's turn ended with that the
    template writes too (its end-of-turn token, e.g. "<|im_end|>"), left out so it is not there twice; "" when
    the turn stopped before it. tools: the schemas passed to the template (None for none).

    Rendered around a fixed probe conversation, so the model's own text is never encoded. ValueError where the
    template refuses the messages (render), renders the probe differently once more messages follow (it cannot
    be continued this way) or does not write `turn_ended_with` after the content."""
    base = render(tokenizer, _PROBE, False, tools)
    full = render(tokenizer, _PROBE + messages, True, tools)
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


class EpisodeTemplate:
    """What an episode needs from the chat template, worked out once on probe conversations (a user message,
    after the system prompt where data.system_prompt sets one, as the data stage renders prompts):

    - `prompt(ids)`: a prepared prompt's ids with the tools described in it. The template's text before the
      user's content, rendered with the tools (`tools=` where the template takes them, else the instructions
      of calls.tool_instructions in the system message), replaces the same text rendered without; the ids
      after it are the prompt's own.
    - `opening(ids, messages)`: the environment's opening messages after the prompt's user message: the
      generation prompt at the prompt's end is replaced by them and a new generation prompt.
    - `after_turn(messages, stop_id)`: continuation_ids after a model turn that ended with `stop_id` (None: cut
      at its length limit); a stop token the template does not write after a message is kept and the
      template's end of turn follows it.

    Only template text is encoded; a prompt that does not hold the expected ids (its own system message, a
    prompt cut at max_prompt_len) is a ValueError saying so. With tools, the template must render tool
    messages after a model turn: one that refuses them (many refuse roles they do not know) is a ValueError
    here rather than at the first call."""

    def __init__(self, tokenizer, schemas: list[dict], system_prompt: str | None, stop_ids: list[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("episodes go through the tokenizer's chat template, and this tokenizer has none")
        self.tok = tokenizer
        try:
            self.tools = schemas if schemas and template_takes_tools(tokenizer) else None
        except TemplateError as e:
            raise ValueError(f"the chat template of {tokenizer.name_or_path!r} refuses a user's message (with a "
                             f"probe tool or without): {type(e).__name__}: {e}") from None
        conversation = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": _USER}]
        plain = self._render(conversation, add_generation_prompt=True, tools=None)
        described = plain
        if schemas:
            described = (self._render(conversation, add_generation_prompt=True, tools=self.tools) if self.tools else
                         self._render(with_tool_instructions(conversation, schemas), add_generation_prompt=True, tools=None))
        at, at_described = plain.find(_USER), described.find(_USER)
        if plain[at:] != described[at_described:]:
            raise ValueError("the chat template renders the user's message differently once tools are described, "
                             "so the tools cannot be added to prepared prompts")
        self._plain_prefix, self._tool_prefix = self._encode(plain[:at]), self._encode(described[:at_described])
        self._conversation = conversation
        self._open = self._render(conversation, add_generation_prompt=False, tools=self.tools)
        with_prompt = self._render(conversation, add_generation_prompt=True, tools=self.tools)
        if not with_prompt.startswith(self._open):
            raise ValueError("the chat template's generation prompt is not text added at the end")
        self._generation_prompt = self._encode(with_prompt[len(self._open):])
        probe = [{"role": "user", "content": _USER}]
        continuation_ids(tokenizer, probe, "", self.tools)  # a template that cannot be continued says so now
        if schemas:  # tools answer in tool messages, one per call: a template that refuses them says so now
            name = schemas[0]["function"]["name"]
            try:
                continuation_ids(tokenizer, [tool_message(name, "1"), tool_message(name, "2")], "", self.tools)
            except ValueError as e:
                raise ValueError(f"tools answer the model in messages with the role 'tool', and {e}; use a model "
                                 "whose chat template takes tool messages") from None
        self.turn_end: dict[int, str] = {}
        for stop in stop_ids:
            text = tokenizer.decode([stop])
            try:
                continuation_ids(tokenizer, probe, text, self.tools)
                self.turn_end[stop] = text
            except ValueError:  # the template does not write it: its own end of turn follows
                self.turn_end[stop] = ""

    def prompt(self, ids: list[int]) -> list[int]:
        n = len(self._plain_prefix)
        if list(ids[:n]) != self._plain_prefix:
            raise ValueError("it does not start as the chat template renders a user's message after data.system_prompt "
                             "(a record with its own system message, or a prompt cut at data.max_prompt_len), so the "
                             "tools cannot be described in it")
        return self._tool_prefix + list(ids[n:])

    def opening(self, ids: list[int], messages: list[dict]) -> list[int]:
        keep = len(ids) - len(self._generation_prompt)
        if list(ids[keep:]) != self._generation_prompt:
            raise ValueError("the prompt does not end in the chat template's generation prompt")
        full = self._render(self._conversation + messages, add_generation_prompt=True, tools=self.tools)
        if not full.startswith(self._open):
            raise ValueError("the chat template renders the prompt differently once the environment's messages "
                             "follow it")
        return list(ids[:keep]) + self._encode(full[len(self._open):])

    def after_turn(self, messages: list[dict], stop_id: int | None) -> list[int]:
        return continuation_ids(self.tok, messages, self.turn_end.get(stop_id, "") if stop_id is not None else "",
                                self.tools)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> str:
        return render(self.tok, messages, add_generation_prompt, tools)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]
