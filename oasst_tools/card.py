"""The dataset card (`README.md`) of an `oasst build` output: YAML header with data_files, source, selection,
the command that rebuilds it, columns, counts and license, for threads or preference pairs.

Standard library only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from oasst_tools.pairs import PROMPT_OUTCOMES
from oasst_tools.settings import build_command

if TYPE_CHECKING:
    from oasst_tools.build import BuildConfig, BuildReport


def dataset_card(cfg: BuildConfig, report: BuildReport) -> str:
    """A Hugging Face dataset card: YAML header with data_files, source, filters, counts, license."""
    ext = cfg.file_format
    splits = sorted(report.rows, key=lambda s: (s != "train", s))
    files = "\n".join(f"  - split: {s}\n    path: {s}.{ext}" for s in splits)
    counts = "\n".join(
        f"| {split} | {lang} | {n} |" for split in splits for lang, n in sorted(report.rows_by_lang[split].items())
    )
    dropped = "\n".join(f"| {k} | {v} |" for k, v in sorted(report.dropped.items())) or "| (none) | 0 |"
    title, selection, columns, unit = _thread_text(cfg) if cfg.pairs is None else _pair_text(cfg, report)
    return f"""---
license: apache-2.0
configs:
- config_name: default
  description: "oasst build {_fingerprint(cfg, report)}"
  data_files:
{files}
---
# {title} built by `oasst build`

Built from: {", ".join(f"`{i}`" for i in cfg.inputs)} (OpenAssistant Conversations, Apache-2.0).
{selection}

Built with: `{build_command(cfg)}`
Splits: {"hash of message_tree_id, test_size=" + str(cfg.test_size) + ", seed=" + str(cfg.seed)
         if cfg.test_size is not None else "the input's own splits (validation -> test), else all train"}.

{columns}

| split | lang | {unit} |
|---|---|---|
{counts}

Trees read: {report.read.trees}; messages read: {report.read.messages}; messages whose parent was missing
(dropped with their subtrees): {report.read.orphaned}; bad records skipped: {sum(report.read.skipped.values())}.

| dropped | count |
|---|---|
{dropped}

License: Apache-2.0, as OpenAssistant Conversations (OASST1/OASST2).
"""


def _fingerprint(cfg: BuildConfig, report: BuildReport) -> str:
    """A digest of the build's settings, inputs (size, mtime) and counts: same data, same value; else another."""
    # datasets 5.2 caches `load_dataset(DIR)` of a folder with YAML `configs` under the folder's name and a hash of
    # the YAML, not of the files: without a per-build value here, loading a rebuilt --out returned the previous
    # build's rows. Delete once datasets hashes a local folder's data files (it does for load_dataset("json", ...)).
    import hashlib  # late, as in build.hash_split: OpenSSL's set-up is not paid at start-up
    import json

    inputs: list[list[object]] = []
    for name in cfg.inputs:
        try:
            info = os.stat(name)
            inputs.append([name, info.st_size, info.st_mtime_ns])
        except OSError:  # a hub id
            inputs.append([name])
    counts = {k: v for k, v in report.to_dict().items() if k != "seconds"}
    text = json.dumps([repr(cfg), inputs, counts], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]


_PAIR_MODE_TEXT = {"best": "the best with each of the others", "adjacent": "each with the next one",
                   "all": "every two"}


def _thread_text(cfg: BuildConfig) -> tuple[str, str, str, str]:
    """Title, selection, columns and count unit of a card of threads."""
    sel = cfg.selection
    selection = (f"Selection: `{sel.mode}`{f' (k={sel.top_k})' if sel.mode == 'top-k' else ''}, following the rules "
                 "in the\noasst-tools documentation (deleted and spam messages dropped with their subtrees; "
                 "best-ranked reply first:\nranked before unranked, then rank, then oldest).")
    columns = ("Columns: `text` (`### Human: ...### Assistant: ...`), `messages` (`role`/`content`), "
               "`message_tree_id`, `lang`,\n`num_turns` (messages in the thread).")
    return "Guanaco-style conversations", selection, columns, "rows"


def _pair_text(cfg: BuildConfig, report: BuildReport) -> tuple[str, str, str, str]:
    """Title, selection, columns and count unit of a card of preference pairs."""
    prompts = "; ".join(f"{split}: " + ", ".join(f"{k.replace('_', ' ')} {report.prompts[split][k]}"
                                                 for k in PROMPT_OUTCOMES)
                        for split in sorted(report.prompts, key=lambda s: (s != "train", s))) or "none"
    selection = f"""Selection: `pairs {cfg.pairs}`, following the rules in the oasst-tools documentation (deleted and
spam messages dropped with their subtrees). For every surviving prompt, its replies that carry a rank, best first
by (rank, created_date, message_id), are paired: {_PAIR_MODE_TEXT[cfg.pairs or "all"]}. Replies of equal rank make
no pair. Prompts (surviving prompter messages) per split: {prompts}."""
    columns = """Columns (trl's conversational preference format): `prompt` (the conversation from the root to the
prompt, `role`/`content`), `chosen` and `rejected` (one assistant message each; chosen has the better rank),
`prompt_id`, `chosen_id`, `rejected_id` (message ids), `chosen_rank`, `rejected_rank`, `message_tree_id`, `lang`
(of the root prompt)."""
    return "Preference pairs", selection, columns, "pairs"
