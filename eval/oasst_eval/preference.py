"""guanaco_pairs: preference accuracy on the held-out pairs of `oasst build --pairs` (its test.jsonl), for lm-eval.

Each pair is one two-choice `multiple_choice` item. The context is the prompt conversation in the model's format up
to where a reply starts; the choices are the chosen and the rejected reply as that format writes them; gold is the
chosen one. lm-eval's loglikelihood scores each choice given the context, so the fixed order [chosen, rejected]
with gold 0 favours neither (only an exact tie goes to the first choice, and pairs whose two replies render to the
same text are skipped, with a warning).

lm-eval scores a choice only whole: a reply longer than the model's window (lm-eval's `max_length`) stops it with an
assertion. `oasst eval` tells this module the window once the model is loaded (`set_window`), and the pairs with
such a reply are left out of the scored documents, with one warning line (the plain lm_eval CLI keeps them).

- guanaco: context = the prompt turns and the assistant marker without its space (oasst_tools.conversation's
  markers, as in the generation prompt `oasst generate` uses); choice = a space and the reply: what `oasst build`
  writes between that marker and the next human marker.
- chat-template: context = the template's generation prompt after the prompt turns; choice = the conversation with
  the reply rendered in full, minus that prompt: the reply and the token that closes its turn (`<|im_end|>`), the
  whitespace after it dropped as training drops it. A template that renders the reply's start differently from
  its generation prompt is one error line.

    lm_eval --model hf --model_args pretrained=M --include_path eval/oasst_eval/tasks --tasks guanaco_pairs \\
            --metadata '{"data": "out/pairs"}'

Only the standard library at the top: datasets and transformers load when lm-eval asks for the documents.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from oasst_tools.conversation import ASSISTANT_CUE, chat_prompt, render_chat, render_guanaco, resolve_format
from oasst_tools.errors import OasstError
from oasst_eval.data import guanaco_file, id_text, loaded_tokenizer, move_trailing_space, numbered_task_rows

TASK = "guanaco_pairs"
_WINDOW: dict[str, int | None] = {"tokens": None}  # the scored model's window, set by `oasst eval` for one run
_WARNED: set[tuple[Any, int]] = set()  # (dataset, window) already reported: lm-eval reads the documents many times


def pairs_dataset(
    *, data: str | None = None, tokenizer: str | None = None, pretrained: Any = None,
    gguf_file: str | None = None, format: str = "guanaco", **_: Any,  # noqa: A002 - the --format vocabulary
) -> Any:
    """lm-eval `custom_dataset` for `guanaco_pairs`: one row per pair with `context` and `choices` [chosen, rejected]
    rendered in the model's conversation format (`format`: guanaco, chat-template, or auto), and the token count of
    its longer reply as lm-eval will score it."""
    import datasets

    name = tokenizer or (pretrained if isinstance(pretrained, str) else None)
    if name is None:
        raise OasstError(f"task {TASK} needs the tokenizer to render and count the replies: "
                         """pass --metadata '{"tokenizer": NAME}'""")
    tok = loaded_tokenizer(name, gguf_file)
    fmt = resolve_format(format, tok)
    path = guanaco_file(data, TASK)
    rows, same = [], 0
    for lineno, row in numbered_task_rows(path, TASK):
        where = f"{path}:{lineno}"
        context, chosen = reply_choice(tok, fmt, row["prompt"], row["chosen"], where)
        _, rejected = reply_choice(tok, fmt, row["prompt"], row["rejected"], where)
        if chosen == rejected:
            same += 1  # both replies would score the same: no preference to measure
            continue
        rows.append({
            "context": context,
            "choices": [chosen, rejected],
            "reply_tokens": max(choice_tokens(tok, context, chosen), choice_tokens(tok, context, rejected)),
            "message_tree_id": id_text(row.get("message_tree_id")),
            "chosen_id": id_text(row.get("chosen_id")),
            "rejected_id": id_text(row.get("rejected_id")),
        })
    if same:
        sys.stderr.write(f"warning: {path}: {same} pair(s) whose chosen and rejected replies render to the same text "
                         f"were skipped: neither reply can be preferred\n")
    if not rows:
        raise OasstError(f"{path}: no pairs to score (every pair's two replies render to the same text)")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def reply_choice(tokenizer: Any, fmt: str, prompt: Sequence[dict[str, Any]], reply: Sequence[dict[str, Any]],
                 where: str) -> tuple[str, str]:
    """(context, choice): the prompt turns as the model sees them before a reply, and the reply as it continues them."""
    if fmt == "guanaco":
        # The generation prompt ends at the marker without its space: tokenizers attach the space to the reply.
        context = render_guanaco(prompt, where) + ASSISTANT_CUE
        full = render_guanaco([*prompt, *reply], where)
    else:
        context = chat_prompt(tokenizer, prompt, where)
        full = render_chat(tokenizer, [*prompt, *reply], where)
    if not full.startswith(context):
        at = next((i for i, (a, b) in enumerate(zip(context, full)) if a != b), min(len(context), len(full)))
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise OasstError(f"{where}: the chat template of {name} renders a reply's turn differently from its "
                         f"generation prompt (the prompt goes on {context[at:at + 30]!r}, the reply's turn "
                         f"{full[at:at + 30]!r}), so the reply cannot be cut from the conversation; score with "
                         "--format guanaco")
    choice = full[len(context):]
    # Training ends a chat-template reply at its end-of-turn token, without the whitespace the template writes after.
    return context, choice if fmt == "guanaco" else choice.rstrip()


def choice_tokens(tokenizer: Any, context: str, choice: str) -> int:
    """How many tokens lm-eval scores for `choice` after `context` (TemplateLM._encode_pair with HFLM's default
    special tokens: the context's trailing whitespace moves to the choice; the choice's tokens are what the whole
    adds to the context's)."""
    context, choice = move_trailing_space(context, choice)
    # verbose=False: replies longer than the model's window are expected; they are left out later, with a warning.
    whole = tokenizer(context + choice, verbose=False)["input_ids"]
    return len(whole) - len(tokenizer(context, verbose=False)["input_ids"])


def set_window(tokens: int | None) -> None:
    """The window of the model about to be scored (lm-eval's `max_length`); None: score every pair."""
    _WINDOW["tokens"] = tokens
    _WARNED.clear()


def pairs_process_docs(dataset: Any) -> Any:
    """lm-eval `process_docs`: the pairs whose replies both fit the model's window (all of them when none is set)."""
    window = _WINDOW["tokens"]
    if window is None:
        return dataset
    keep = [i for i, n in enumerate(dataset["reply_tokens"]) if n <= window]
    if len(keep) == len(dataset):
        return dataset
    key = (getattr(dataset, "_fingerprint", None) or id(dataset), window)
    if key not in _WARNED:
        _WARNED.add(key)
        sys.stderr.write(f"warning: {TASK}: {len(dataset) - len(keep)} of {len(dataset)} pairs have a reply longer "
                         f"than the model's {window}-token window and are not scored (lm-eval scores a reply only "
                         "whole)\n")
    if not keep:
        raise OasstError(f"{TASK}: every pair has a reply longer than the model's {window}-token window; "
                         "nothing to score")
    return dataset.select(keep)

