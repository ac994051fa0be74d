"""Conversation formats, defined once for build, train, generate, chat and eval: Guanaco text and chat templates.

    guanaco_text([("prompter", "Hi"), ("assistant", "Hello!")])   # the `text` column `oasst build` writes
    guanaco_prompt("Tell me a story.")                             # what `oasst generate` hands the model
    fmt = resolve_format("auto", tokenizer)                        # chat-template when the tokenizer has one
    enc = encode(tokenizer, messages, fmt)                         # token ids, loss mask, where replies end
    kept = enc.cut(512)                                            # the mask is cut with the ids

Guanaco: a human marker, the prompt, an assistant marker, the reply, the next human marker..., turns concatenated
with no separator. With the loss on the assistant, a reply is trained with what ends it: the next human marker
(where generation stops) or the EOS appended after a final reply.

Chat templates: the tokenizer's own Jinja template renders the conversation. The assistant tokens are its
`{% generation %}` spans where it has them, else what each assistant turn adds to the rendered text: from the end of
the generation prompt before it to the end of its turn, found by rendering growing prefixes of the conversation.
Either way the token that closes a reply (`<|im_end|>`, `<|eot_id|>`, `</s>`) is trained, so the model learns to
stop; system and user turns are masked.

Standard library only: tokenizers are taken by duck typing (a transformers fast tokenizer), so `oasst build` and
`import oasst_tools` stay light.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from oasst_tools.errors import OasstError, kind

HUMAN = "### Human: "
ASSISTANT = "### Assistant: "
# The markers without their trailing space: tokenizers attach a space to the word after it (" Paris"), so a
# generation prompt ends at ASSISTANT_CUE and the model generates the space; generation stops at HUMAN_STOP.
HUMAN_STOP = HUMAN.rstrip()
ASSISTANT_CUE = ASSISTANT.rstrip()
_GUANACO_MARKER = re.compile(f"{re.escape(HUMAN_STOP)}|{re.escape(ASSISTANT_CUE)}")
# `{% generation %}` / `{%- generation -%}`: the template marks assistant tokens itself.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")

Format = Literal["guanaco", "chat-template"]
FORMATS = ("auto", "guanaco", "chat-template")
# Chat roles, and the names other exports give them (OASST's `prompter`); matched case-insensitively.
ROLES = {"user": "user", "prompter": "user", "human": "user", "assistant": "assistant", "system": "system"}


# ------------------------------------------------------------------------------------------------- messages


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """`messages` as {role, content} turns with chat roles (`prompter` -> `user`); a bad one is an error at `where`."""
    if not isinstance(messages, (list, tuple)):
        raise OasstError(f"{where}: `messages` must be a list of {{role, content}} objects, not {kind(messages)}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise OasstError(f"{where}: messages[{i}] must be a {{role, content}} object, not {kind(turn)}")
        if "role" not in turn:
            raise OasstError(f"{where}: messages[{i}] has no `role`")
        role = turn["role"]
        chat_role = ROLES.get(role.lower()) if isinstance(role, str) else None
        if chat_role is None:
            raise OasstError(f"{where}: messages[{i}] role {role!r} is not user, assistant or system")
        content = turn.get("content")
        if not isinstance(content, str):
            raise OasstError(f"{where}: messages[{i}] content must be a string, not {kind(content)}")
        turns.append({"role": chat_role, "content": content})
    return turns


def chat_messages(turns: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, text) turns as {role, content} messages with chat roles (`prompter` -> `user`), as build writes them."""
    return [{"role": ROLES[role], "content": text} for role, text in turns]


# ------------------------------------------------------------------------------------------------- Guanaco


def guanaco_text(turns: Iterable[tuple[str, str]]) -> str:
    """(role, text) turns as Guanaco text; every role but `assistant` (`prompter`, `user`) is a human turn."""
    # One join over markers and texts: `marker + text` first would copy every text twice.
    parts: list[str] = []
    for role, text in turns:
        parts.append(ASSISTANT if role == "assistant" else HUMAN)
        parts.append(text)
    return "".join(parts)


def render_guanaco(messages: Any, where: str = "messages") -> str:
    """{role, content} turns as Guanaco text, exactly as `oasst build` writes its `text` column."""
    return guanaco_text((turn["role"], turn["content"]) for turn in _guanaco_turns(messages, where))


def _guanaco_turns(messages: Any, where: str) -> list[dict[str, str]]:
    turns = check_messages(messages, where)
    for i, turn in enumerate(turns):
        if turn["role"] == "system":
            raise OasstError(f"{where}: messages[{i}] is a system turn, which the Guanaco format has no place for; "
                             "train with format chat-template, or drop the system turns")
    return turns


def guanaco_turn_spans(messages: Any, where: str = "messages") -> tuple[str, list[tuple[int, int]], bool]:
    """`render_guanaco`'s text with `guanaco_spans`' loss spans taken from the turns themselves: a reply and the
    marker after it, found by where each turn starts, not by searching the text, so a user turn that quotes the
    assistant marker stays untrained."""
    turns = _guanaco_turns(messages, where)
    text = guanaco_text((turn["role"], turn["content"]) for turn in turns)
    starts, pos = [], 0
    for turn in turns:
        starts.append(pos)
        pos += len(ASSISTANT if turn["role"] == "assistant" else HUMAN) + len(turn["content"])
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        if i + 1 < len(turns):
            cue = ASSISTANT_CUE if turns[i + 1]["role"] == "assistant" else HUMAN_STOP
            end = starts[i + 1] + len(cue)
        else:
            end = len(text)
        spans.append((starts[i] + len(ASSISTANT_CUE), end))
    return text, spans, bool(turns) and turns[-1]["role"] == "assistant"


def parse_guanaco(text: str, where: str = "text") -> list[dict[str, str]]:
    """Guanaco text back into {role, content} turns (a chat template on a dataset that has only `text`)."""
    markers = list(_GUANACO_MARKER.finditer(text))
    if not markers or markers[0].start() != 0:
        raise OasstError(f"{where}: `text` does not start with {HUMAN_STOP!r} or {ASSISTANT_CUE!r}, so its turns "
                         "cannot be told apart for a chat template; give the row a `messages` list, or train with "
                         "format guanaco")
    turns = []
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        role = "assistant" if m.group() == ASSISTANT_CUE else "user"
        turns.append({"role": role, "content": text[m.end():end].removeprefix(" ")})
    return turns


def guanaco_prompt(prompt: str) -> str:
    """The generation prompt for one human turn: the human marker, `prompt`, the assistant marker without its space."""
    return f"{HUMAN}{prompt}{ASSISTANT_CUE}"


def guanaco_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Character spans that carry loss (each reply + the human marker after it), and whether `text` ends in a reply."""
    markers = list(_GUANACO_MARKER.finditer(text))
    spans = []
    for i, m in enumerate(markers):
        if m.group() != ASSISTANT_CUE:
            continue
        nxt = markers[i + 1] if i + 1 < len(markers) else None
        spans.append((m.end(), nxt.end() if nxt is not None else len(text)))
    return spans, bool(markers) and markers[-1].group() == ASSISTANT_CUE


# ------------------------------------------------------------------------------------------------- formats


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(requested: str, tokenizer: Any) -> Format:
    """`auto` -> chat-template when the tokenizer has one, else guanaco; chat-template without one is an error."""
    if requested not in FORMATS:
        raise OasstError(f"format {requested!r}: expected one of {', '.join(FORMATS)}")
    if requested == "auto":
        return "chat-template" if has_chat_template(tokenizer) else "guanaco"
    if requested == "chat-template" and not has_chat_template(tokenizer):
        raise OasstError(f"format chat-template: the tokenizer of {_name(tokenizer)} has no chat template; "
                         "train with format guanaco (or auto)")
    return requested  # type: ignore[return-value]


def render_chat(tokenizer: Any, messages: Any, where: str = "messages") -> str:
    """{role, content} turns rendered by the tokenizer's chat template (what chat-template training reads)."""
    _template_source(tokenizer)  # no template: one line saying so, not transformers' error
    return _render(tokenizer, check_messages(messages, where), where)


def chat_prompt(tokenizer: Any, messages: Any, where: str = "messages") -> str:
    """The chat template's generation prompt after `messages` (what generate/chat hand a chat-template model)."""
    _template_source(tokenizer)
    return _render(tokenizer, check_messages(messages, where), where, add_generation_prompt=True)


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The tokens the chat template closes a reply with (`<|im_end|>`, `<|eot_id|>`): where generation stops."""
    sample = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    enc = encode_chat(tokenizer, sample, where="a one-exchange sample conversation")
    return sorted({enc.ids[e] for e in enc.ends})


# ------------------------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """One conversation as training sees it: token ids, the loss mask, and where the assistant turns end."""

    ids: list[int]
    mask: list[int]  # 1: the token carries loss
    # Index of the token that closes each assistant turn (end-of-turn, EOS, the next human marker), for the
    # turns that have one; trained in both loss modes, so the model learns to stop.
    ends: tuple[int, ...]
    turns: int  # assistant turns in the conversation

    def cut(self, max_length: int | None) -> Encoded:
        """The first `max_length` tokens, with the mask and the turn ends cut the same way (None: all)."""
        if max_length is None or len(self.ids) <= max_length:
            return self
        return Encoded(self.ids[:max_length], self.mask[:max_length],
                       tuple(e for e in self.ends if e < max_length), self.turns)


def encode(tokenizer: Any, conversation: str | Sequence[dict[str, Any]], format: Format,  # noqa: A002
           assistant_only: bool = True, where: str = "row") -> Encoded:
    """A conversation (Guanaco text or {role, content} messages) as ids + loss mask in `format`."""
    if format == "guanaco":
        if isinstance(conversation, str):
            return encode_guanaco(tokenizer, conversation, assistant_only)
        text, spans, ends_in_reply = guanaco_turn_spans(conversation, where)
        return encode_guanaco(tokenizer, text, assistant_only, (spans, ends_in_reply))
    messages = parse_guanaco(conversation, where) if isinstance(conversation, str) else conversation
    return encode_chat(tokenizer, messages, assistant_only, where)


def encode_guanaco(tokenizer: Any, text: str, assistant_only: bool = True,
                   spans: tuple[list[tuple[int, int]], bool] | None = None) -> Encoded:
    """Token ids of Guanaco `text` + EOS, and the loss mask: each reply and what ends it, or every token.
    `spans`: the loss spans and whether the text ends in a reply when the turns are known (`guanaco_turn_spans`),
    else found from the markers in `text`."""
    _require_fast(tokenizer)
    # verbose=False: rows longer than the model's window are expected here; they are cut later, with the mask.
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    eos = tokenizer.eos_token_id
    if ids and ids[-1] == eos:
        ids, offsets = ids[:-1], offsets[:-1]  # tokenizers that add EOS themselves: keep exactly one
    ids.append(eos)
    spans, ends_in_reply = spans if spans is not None else guanaco_spans(text)
    # A token carries loss when it starts inside a span (special tokens have empty offsets: never).
    mask = [int(b > a and any(s <= a < e for s, e in spans)) for a, b in offsets]
    mask.append(int(ends_in_reply))
    ends = []
    for k, (s, e) in enumerate(spans):
        if k == len(spans) - 1 and ends_in_reply:
            ends.append(len(ids) - 1)  # the final reply ends with the appended EOS
            continue
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and s <= a < e]
        if inside:
            ends.append(inside[-1])  # the last token of the human marker after the reply
    return Encoded(ids, mask if assistant_only else [1] * len(ids), tuple(ends), len(spans))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], assistant_only: bool = True,
                where: str = "messages") -> Encoded:
    """Token ids of `messages` rendered by the tokenizer's chat template, and the loss mask: the assistant
    turns with the tokens that close them, or every token."""
    turns = check_messages(messages, where)
    replies = sum(turn["role"] == "assistant" for turn in turns)
    if not turns:
        return Encoded([], [], (), 0)  # templates refuse an empty conversation; an empty row has nothing to learn
    _require_fast(tokenizer)
    if _GENERATION_BLOCK.search(_template_source(tokenizer)):
        # verbose=False: rows longer than the model's window are expected; they are cut later, with the mask.
        out = _apply(tokenizer, turns, where, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                     tokenizer_kwargs={"verbose": False})
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text, spans = _prefix_spans(tokenizer, turns, where)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(enc["input_ids"])
        # A token carries loss when it overlaps a span: the rule transformers applies to `{% generation %}` spans.
        mask = [int(b > a and any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    ends = _close_turns(ids, mask, _closing_ids(tokenizer))
    return Encoded(ids, mask if assistant_only else [1] * len(ids), ends, replies)


def _prefix_spans(tokenizer: Any, turns: list[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span each assistant turn adds to it (without the whitespace
    the template writes after a turn: the reply ends at its end-of-turn token)."""
    full = _render(tokenizer, turns, where)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        upto = full if i + 1 == len(turns) else _render(tokenizer, turns[:i + 1], where)
        if not full.startswith(upto):
            raise OasstError(f"{where}: the chat template of {_name(tokenizer)} renders messages[{i}] differently "
                             "once later turns follow, so the tokens of that reply cannot be found; use a template "
                             "with {% generation %} markers, or format guanaco")
        end = len(upto.rstrip())
        start = -1
        if i:
            before = _render(tokenizer, turns[:i], where, add_generation_prompt=True)
            if upto.startswith(before):
                start = len(before)
            else:
                # A generation prompt that differs from how the template opens a past reply (an empty thinking
                # block, say): the reply starts where its content does, after the turns before it.
                start = upto.find(turn["content"], len(_render(tokenizer, turns[:i], where)))
        elif turn["content"]:
            start = upto.find(turn["content"])  # a conversation that opens with a reply: no prompt before it
        if start < 0:
            raise OasstError(f"{where}: the chat template of {_name(tokenizer)} does not show the content of "
                             f"messages[{i}] after the turns before it; use a template with {{% generation %}} "
                             "markers, or format guanaco")
        spans.append((start, max(start, end)))
    return full, spans


def _close_turns(ids: list[int], mask: list[int], closers: frozenset[int]) -> tuple[int, ...]:
    """Where each assistant run of `mask` ends with a closing token, taking in the closing token right after a run
    that stops short of it (a `{% generation %}` span without `<|im_end|>`); `mask` is changed in place."""
    ends = []
    i, n = 0, len(mask)
    while i < n:
        if not mask[i]:
            i += 1
            continue
        while i + 1 < n and mask[i + 1]:
            i += 1
        if ids[i] in closers:
            ends.append(i)
        elif i + 1 < n and ids[i + 1] in closers:
            mask[i + 1] = 1
            ends.append(i + 1)
            i += 1
        i += 1
    return tuple(ends)


def _closing_ids(tokenizer: Any) -> frozenset[int]:
    """Tokens that can end a turn: EOS and the special tokens (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(i for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
               if getattr(token, "special", False))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _render(tokenizer: Any, turns: list[dict[str, str]], where: str, add_generation_prompt: bool = False) -> str:
    return _apply(tokenizer, turns, where, tokenize=False, add_generation_prompt=add_generation_prompt)


def _apply(tokenizer: Any, turns: list[dict[str, str]], where: str, **kwargs: Any) -> Any:
    """`tokenizer.apply_chat_template`, with a template that fails (`raise_exception`, a Jinja error) as one line."""
    try:
        return tokenizer.apply_chat_template(turns, **kwargs)
    except Exception as exc:  # noqa: BLE001 - templates raise TemplateError, TypeError, ValueError, anything
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OasstError(f"{where}: the chat template of {_name(tokenizer)} fails on this conversation: "
                         f"{detail[:300]}") from None


def _template_source(tokenizer: Any) -> str:
    """The Jinja source of the tokenizer's default chat template (named templates: the `default` one)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), "")
    if not isinstance(template, str) or not template:
        raise OasstError(f"format chat-template: the tokenizer of {_name(tokenizer)} has no chat template; "
                         "train with format guanaco (or auto)")
    return template


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise OasstError(f"tokenizer of {_name(tokenizer)} is not a fast tokenizer; "
                         "the assistant-only mask needs character offsets")


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
