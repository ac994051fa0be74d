"""Local data for the shipped lm-eval tasks: where it lives and how lm-eval loads it.

The task YAMLs in `oasst_eval/tasks/` name the functions below (`custom_dataset`, `process_results`,
aggregations). lm-eval calls `custom_dataset` with the task's metadata as keyword arguments, so the
data location reaches it the same way from `oasst eval` and from the plain `lm_eval` CLI:

    lm_eval --include_path eval/oasst_eval/tasks --tasks hellaswag --metadata '{"data_dir": "../shared/data"}' ...
    OASST_EVAL_DATA=../shared/data lm_eval --include_path eval/oasst_eval/tasks --tasks hellaswag ...

Only the standard library is imported at the top: `oasst eval` checks paths before torch loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from oasst_tools.conversation import ROLES
from oasst_tools.errors import OasstError, OasstInputError, describe_os_error, kind, shown, whole_number
from oasst_tools.files import split_rows

DATA_ENV = "OASST_EVAL_DATA"
GUANACO_ENV = "OASST_EVAL_GUANACO"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Only a source checkout has fixtures/; an installed wheel falls back to the Hub (see `hellaswag_dataset`).
FIXTURE_DIR = Path(__file__).resolve().parents[2] / "fixtures"

# Task -> (split read for scoring, optional splits read when present). One folder per task under a data dir.
LOCAL_SPLITS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hellaswag": ("validation", ("train",)),
}
# The same task on the Hub, used only when no local data dir can be found at all.
HUB_FALLBACK: dict[str, str] = {"hellaswag": "Rowan/hellaswag"}

_TOKENIZERS: dict[str, Any] = {}
_PROCESSED: dict[Any, Any] = {}  # dataset fingerprint -> processed documents


def resolve_data_dir(data_dir: str | Path | None) -> tuple[Path | None, str]:
    """The data dir and where it came from: `--data-dir`, then $OASST_EVAL_DATA, then the fixture subset."""
    if data_dir:
        return Path(data_dir), "--data-dir"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]), DATA_ENV
    if (FIXTURE_DIR / "hellaswag").is_dir():
        return FIXTURE_DIR, "fixture subset"
    return None, "hub"


def split_file(data_dir: Path, task: str, split: str) -> Path | None:
    """`DIR/TASK/SPLIT.jsonl`, else `.jsonl.gz`, else None."""
    for suffix in (".jsonl", ".jsonl.gz"):
        path = data_dir / task / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def require_split(data_dir: Path, task: str, split: str, source: str) -> Path:
    """The split file, or one error line that names the layout a data dir must have."""
    path = split_file(data_dir, task, split)
    if path is None:
        raise OasstError(
            f"{data_dir} (from {source}) has no {task}/{split}.jsonl or {task}/{split}.jsonl.gz; "
            f"a data dir holds one folder per task with the original dataset's split files"
        )
    return path


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows (JSON objects) of a `.jsonl` or `.jsonl.gz` file; a broken line, bad bytes, a cut or damaged gzip
    stream or an unreadable file is one error naming `path:line`."""
    for _, row in split_rows(path):
        yield row


# HellaSwag's columns besides the ones lm-eval reads, with their types (the Hub dataset's schema): a row may lack
# them; one with another type, or a column outside the schema, could not share a table with the other rows.
HELLASWAG_EXTRA = {"ind": int, "ctx": str, "source_id": str, "split": str, "split_type": str}


def _check_hellaswag_row(row: dict[str, Any]) -> str | None:
    """What is wrong with one HellaSwag row for lm-eval's preprocessing, or None."""
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(row.get(key), str):
            return f"`{key}` must be a string, not {kind(row.get(key))}" if key in row else f"no `{key}`"
    endings = row.get("endings")
    if endings is None and "endings" not in row:
        return "no `endings`"
    if not (isinstance(endings, list) and endings and all(isinstance(e, str) for e in endings)):
        given = shown(endings) if isinstance(endings, list) else kind(endings)
        return f"`endings` must be a non-empty list of strings, not {given}"
    for i, ending in enumerate(endings):
        if not _hellaswag_text(ending):
            return (f"ending {i} is empty once lm-eval's hellaswag preprocessing drops its [bracketed] parts: "
                    f"{shown(ending)}")
    if hellaswag_label(row.get("label"), len(endings)) is None:
        return f"`label` must be the index of the right ending (0-{len(endings) - 1}), not {shown(row.get('label'))}"
    for key, wanted in HELLASWAG_EXTRA.items():
        value = row.get(key)
        if value is not None and type(value) is not wanted:
            return f"`{key}` must be {'an integer' if wanted is int else 'a string'}, not {kind(value)}"
    return None


def hellaswag_label(label: Any, choices: int) -> int | None:
    """A HellaSwag `label` (an int, or the Hub's digit string) as the index of the right ending, or None.

    Digits only, as lm-eval reads `{{label}}`: `" 1 "` or `"²"` would pass `int()` or `isdigit()` and then fail
    (or score against no ending) inside lm-eval."""
    if isinstance(label, str):
        label = whole_number(label)
    if type(label) is not int or not 0 <= label < choices:
        return None
    return label


def _hellaswag_text(text: str) -> str:
    """A HellaSwag text after lm-eval's hellaswag `preprocess` (lm_eval/tasks/hellaswag/utils.py): an ending it
    makes empty crashes lm-eval (`choice[0]`), so the row check runs it here, before lm-eval is imported."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_record(row: dict[str, Any]) -> dict[str, Any]:
    """A checked HellaSwag row as lm-eval's table gets it: the schema's columns only, `label` an int."""
    record = {key: row[key] for key in ("activity_label", "ctx_a", "ctx_b", "endings")}
    record["label"] = hellaswag_label(row["label"], len(row["endings"]))
    record.update((key, row[key]) for key in HELLASWAG_EXTRA if row.get(key) is not None)
    return record


def _check_guanaco_row(row: dict[str, Any]) -> str | None:
    """What is wrong with one `oasst build` test row for guanaco_test, or None."""
    if "text" not in row and "chosen" in row:
        return ("row is a preference pair (`prompt`, `chosen`, `rejected`), not a conversation: score the test.jsonl "
                "of `oasst build --pairs` with --tasks guanaco_pairs")
    if "text" not in row:
        return f"row has no `text` (it has: {', '.join(map(str, row))})"
    if not isinstance(row["text"], str):
        return f"`text` must be a string, not {kind(row['text'])}"
    if not row["text"].strip():
        return "`text` is empty"
    return None


def _check_pair_row(row: dict[str, Any]) -> str | None:
    """What is wrong with one `oasst build --pairs` test row for guanaco_pairs, or None."""
    if "chosen" not in row and ("text" in row or "messages" in row):
        return ("row is a conversation thread (`text`, `messages`), not a preference pair: guanaco_pairs scores the "
                "test.jsonl of `oasst build --pairs best|adjacent|all --test-size F`")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            return f"row has no `{key}` (it has: {', '.join(map(str, row))})"
    prompt = row["prompt"]
    if not isinstance(prompt, list) or not prompt:
        return f"`prompt` must be a non-empty list of {{role, content}} messages, not {_shape(prompt)}"
    for i, turn in enumerate(prompt):
        problem = _check_turn(turn, f"prompt[{i}]")
        if problem is not None:
            return problem
    if ROLES[prompt[-1]["role"].lower()] != "user":
        return f"`prompt` must end with a user turn, which the replies answer, not {prompt[-1]['role']!r}"
    for key in ("chosen", "rejected"):
        value = row[key]
        if not isinstance(value, list) or len(value) != 1:
            return f"`{key}` must be a list with one assistant message, not {_shape(value)}"
        problem = _check_turn(value[0], f"{key}[0]", "assistant")
        if problem is not None:
            return problem
    return None


def _check_turn(turn: Any, name: str, role: str | None = None) -> str | None:
    """What is wrong with one {role, content} message of a pair (`role`: the one it must have), or None."""
    if not isinstance(turn, dict):
        return f"`{name}` must be a {{role, content}} object, not {kind(turn)}"
    given = turn.get("role")
    chat_role = ROLES.get(given.lower()) if isinstance(given, str) else None
    if chat_role is None:
        return f"`{name}` role must be user, assistant or system, not {given!r}"[:200]
    if role is not None and chat_role != role:
        return f"`{name}` role must be {role}, not {given!r}"[:200]
    content = turn.get("content")
    if not isinstance(content, str):
        return f"`{name}` content must be a string, not {kind(content)}"
    if not content.strip():
        return f"`{name}` content is empty"
    return None


def _shape(value: Any) -> str:
    """How an error names a value that should be a list: `a list of 2`, `a string`..."""
    return f"a list of {len(value)}" if isinstance(value, list) else kind(value)


_CHECKS = {"hellaswag": _check_hellaswag_row, "guanaco_test": _check_guanaco_row, "guanaco_pairs": _check_pair_row}
_ROWS: dict[tuple[str, int, int, str], list[tuple[int, dict[str, Any]]]] = {}
# Task -> (the file its scored documents were read from, the line of each, in lm-eval's document order).
_DOCUMENT_LINES: dict[str, tuple[Path, list[int]]] = {}


def task_rows(path: Path, task: str) -> list[dict[str, Any]]:
    """Every row of one task's data file, each checked (one error naming `path:line` for the first bad one)."""
    return [row for _, row in numbered_task_rows(path, task)]


def numbered_task_rows(path: Path, task: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every row of one task's data file, each checked as `task_rows` does.

    Read once per file version: `oasst eval` checks the files before a model loads, and lm-eval reads them again
    through `custom_dataset` later.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise OasstError(f"cannot read {path}: {describe_os_error(exc)}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, task)
    if key not in _ROWS:
        check = _CHECKS[task]
        rows = []
        for lineno, row in split_rows(path):
            problem = check(row)
            if problem is not None:
                raise OasstInputError(path, lineno, problem)
            rows.append((lineno, row))
        if not rows:
            raise OasstError(f"{path}: no rows to score")
        if len(_ROWS) >= 8:
            _ROWS.pop(next(iter(_ROWS)))
        _ROWS[key] = rows
    return _ROWS[key]


def record_document_lines(task: str, path: Path, lines: list[int]) -> None:
    """Remember the file and lines a task's documents came from, for `document_origin`."""
    _DOCUMENT_LINES[task] = (path, lines)


def document_origin(task: str, doc_id: int) -> str:
    """`FILE:LINE` of one of a task's documents when the task's data was read here, else `task document N`."""
    path, lines = _DOCUMENT_LINES.get(task, (None, []))
    return f"{path}:{lines[doc_id]}" if path is not None and 0 <= doc_id < len(lines) else f"{task} document {doc_id}"


def hellaswag_dataset(*, data_dir: str | None = None, **_: Any) -> Any:
    """lm-eval `custom_dataset` for `hellaswag`: local split files in the original schema, else the Hub copy."""
    import datasets

    root, source = resolve_data_dir(data_dir)
    if root is None:
        # No checkout and nothing configured: the same source lm-eval's own task reads.
        return datasets.load_dataset(HUB_FALLBACK["hellaswag"])
    main_split, optional = LOCAL_SPLITS["hellaswag"]
    main_file = require_split(root, "hellaswag", main_split, source)
    record_document_lines("hellaswag", main_file, [line for line, _ in numbered_task_rows(main_file, "hellaswag")])
    splits = {main_split: _hellaswag_table(main_file)}
    for split in optional:
        path = split_file(root, "hellaswag", split)
        # An empty split keeps lm-eval's few-shot sampler happy at zero shots; the CLI refuses k > 0 without it.
        splits[split] = _hellaswag_table(path) if path else datasets.Dataset.from_list([])
    return datasets.DatasetDict(splits)


def _hellaswag_table(path: Path) -> Any:
    """One HellaSwag split file as a `datasets.Dataset` of `hellaswag_record`s."""
    import datasets

    return datasets.Dataset.from_list([hellaswag_record(row) for row in task_rows(path, "hellaswag")])


def hellaswag_process_docs(dataset: Any) -> Any:
    """lm-eval's own hellaswag `process_docs`, run once per dataset instead of at every read of the documents.

    lm-eval 0.4.13 re-runs `process_docs` (a `datasets.map` over all 10,042 rows) each time a task reads its
    evaluation documents, three times per run, even with `--limit`. Registered as the `lm_eval_hellaswag_docs_cache`
    patch: when `process_docs` changed, it runs uncached (one warning line); when it is gone, one error line. Delete
    when lm-eval caches processed docs.
    """
    from oasst_model import patches

    if not patches.applies("lm_eval_hellaswag_docs_cache"):
        try:
            from lm_eval.tasks.hellaswag.utils import process_docs as uncached
        except ImportError:
            raise OasstError(f"lm-eval {patches.installed('lm-eval')} has no lm_eval.tasks.hellaswag.utils."
                             "process_docs, the preprocessing the shipped hellaswag task reuses; install "
                             "lm-eval 0.4.13") from None
        return uncached(dataset)
    from lm_eval.tasks.hellaswag.utils import process_docs

    key = getattr(dataset, "_fingerprint", None) or id(dataset)
    if key not in _PROCESSED:
        if len(_PROCESSED) >= 8:  # a long-lived process loading many datasets keeps only the latest few
            _PROCESSED.pop(next(iter(_PROCESSED)))
        _PROCESSED[key] = process_docs(dataset)
    patches.activated("lm_eval_hellaswag_docs_cache", once=True)  # a cache hit is the patch at work too
    return _PROCESSED[key]


def register_tokenizer(name: str, tokenizer: Any) -> None:
    """Let `guanaco_test` and `guanaco_pairs` use an already-loaded tokenizer instead of loading `name` again."""
    _TOKENIZERS[name] = tokenizer


def loaded_tokenizer(name: str, gguf_file: str | None = None) -> Any:
    """The tokenizer registered under `name`, else `name` loaded (once) with transformers."""
    return _TOKENIZERS.get(name) or _load_tokenizer(name, gguf_file)


@cache
def _load_tokenizer(name: str, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(name, **kwargs)


def guanaco_file(data: str | Path | None, task: str = "guanaco_test") -> Path:
    """`test.jsonl` of an `oasst build` output folder (`--data`, else $OASST_EVAL_GUANACO); guanaco_pairs wants one
    built with `--pairs`."""
    build = "`oasst build --pairs MODE --test-size F`" if task == "guanaco_pairs" else "`oasst build`"
    data = data or os.environ.get(GUANACO_ENV)
    if not data:
        raise OasstError(f"task {task} needs --data DIR: the output folder of {build} (with test.jsonl)")
    from oasst_tools.files import build_split

    path = Path(data)
    path = path if path.is_file() else build_split(path, "test") or path / "test.jsonl"
    if not path.is_file():
        from oasst_tools.files import path_problem

        problem = path_problem(path)
        raise OasstError(f"{path} not found" + (f" ({problem})" if problem else "")
                         + f": --data must be an {build} output folder with test.jsonl")
    return path


def guanaco_test_dataset(
    *, data: str | None = None, tokenizer: str | None = None, pretrained: Any = None,
    gguf_file: str | None = None, format: str = "guanaco", **_: Any,  # noqa: A002 - the --format vocabulary
) -> Any:
    """lm-eval `custom_dataset` for `guanaco_test`: the held-out split of `oasst build` in the conversation format
    the model was trained in (guanaco: the `text` column; chat-template: `messages` through the tokenizer's
    template; auto: the template when the tokenizer has one), with token counts."""
    import datasets

    from oasst_tools.conversation import render_chat, resolve_format

    name = tokenizer or (pretrained if isinstance(pretrained, str) else None)
    if name is None:
        raise OasstError("task guanaco_test needs the tokenizer to count tokens: "
                         """pass --metadata '{"tokenizer": NAME}'""")
    tok = loaded_tokenizer(name, gguf_file)
    fmt = resolve_format(format, tok)
    path = guanaco_file(data)
    rows = []
    for n, row in enumerate(task_rows(path, "guanaco_test"), 1):
        # `text` is what `oasst build` rendered with oasst_tools.conversation; a chat template renders `messages`.
        text = row["text"] if fmt == "guanaco" else render_chat(tok, row.get("messages"), f"{path} row {n}")
        # lm-eval's rolling loglikelihood scores every token of tok_encode(text): the same count, so
        # loss is per scored token (HFLM's default add_special_tokens).
        rows.append({
            "text": text,
            "message_tree_id": id_text(row.get("message_tree_id")),
            "num_tokens": len(tok.encode(text)),
        })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def id_text(value: Any) -> str:
    """An id as written, or "" when the row has none or a non-string one (a table column takes one type)."""
    return value if isinstance(value, str) else ""


def guanaco_text(doc: dict[str, Any]) -> str:
    """The string lm-eval scores: the whole formatted conversation, untouched by Jinja."""
    return doc["text"]


def guanaco_process_results(doc: dict[str, Any], results: Sequence[float]) -> dict[str, tuple[float, int]]:
    """Per-document (loglikelihood, weight) pairs for token, word and byte level scores."""
    (loglikelihood,) = results
    text = doc["text"]
    return {
        "token_loss": (loglikelihood, doc["num_tokens"]),
        "token_perplexity": (loglikelihood, doc["num_tokens"]),
        "word_perplexity": (loglikelihood, len(re.split(r"\s+", text))),
        "bits_per_byte": (loglikelihood, len(text.encode("utf-8"))),
    }


def token_loss(items: Sequence[tuple[float, int]]) -> float:
    """Mean negative log-likelihood per token (nats), pooled over documents."""
    total_ll = sum(ll for ll, _ in items)
    total_tokens = sum(n for _, n in items)
    return -total_ll / total_tokens


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's `TemplateLM._encode_pair` split: the context's trailing whitespace moves to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation
