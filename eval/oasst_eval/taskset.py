"""Turn `--tasks` names into loaded lm-eval tasks, or into one error line (unknown name, no data, offline).

The shipped tasks (`oasst_eval/tasks/*/*.yaml`) override lm-eval's tasks of the same name. Indexing all of
lm-eval's ~14,700 task names takes about 10 s, so it happens only when a name is not one of ours.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError
from oasst_eval.data import LOCAL_SPLITS, TASKS_DIR, guanaco_file, require_split, resolve_data_dir, split_file
from oasst_eval.data import task_rows


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML file for the tasks this package ships."""
    found = {}
    for path in sorted(TASKS_DIR.glob("*/*.yaml")):
        match = re.search(r"^task:\s*(\S+)\s*$", path.read_text(encoding="utf-8"), re.MULTILINE)
        if match:
            found[match.group(1)] = path
    return found


def check_local_data(
    tasks: Sequence[str], data_dir: str | None, data: str | None, num_fewshot: int | None,
) -> dict[str, Any]:
    """Fail fast, before any model loads, when a local task's files are missing; return task metadata."""
    root, source = resolve_data_dir(data_dir)
    metadata: dict[str, Any] = {}
    for task in tasks:
        if task in LOCAL_SPLITS and root is not None:
            main_split, optional = LOCAL_SPLITS[task]
            if num_fewshot and task == "hellaswag" and not (root / task / "train.jsonl").is_file() \
                    and not (root / task / "train.jsonl.gz").is_file():
                raise OasstError(f"--num-fewshot {num_fewshot} needs {root}/hellaswag/train.jsonl[.gz]: "
                                 f"lm-eval draws hellaswag's examples from the train split")
            # Every row read and checked now: a bad line is one error before a model loads, not a traceback
            # from inside lm-eval afterwards.
            task_rows(require_split(root, task, main_split, source), task)
            for split in optional:
                path = split_file(root, task, split)
                if path is not None:
                    task_rows(path, task)
            metadata["data_dir"] = str(root.resolve())
        if task in ("guanaco_test", "guanaco_pairs"):
            if num_fewshot and task == "guanaco_pairs":
                raise OasstError(f"--num-fewshot {num_fewshot}: guanaco_pairs is scored zero-shot; its only split is "
                                 "the test pairs, which lm-eval would show the model as examples")
            if num_fewshot and task == "guanaco_test":
                # A perplexity task: lm-eval scores whole conversations, with no examples to show (it recorded the
                # n-shot anyway, and the scores were the zero-shot ones).
                raise OasstError(f"--num-fewshot {num_fewshot}: guanaco_test is a perplexity over whole test "
                                 "conversations and takes no few-shot examples; leave --num-fewshot out")
            path = guanaco_file(data, task)
            task_rows(path, task)
            metadata["data"] = str(path.resolve())
    return metadata


@cache
def _task_manager(with_defaults: bool, metadata_json: str) -> Any:
    from lm_eval.tasks import TaskManager

    # lm-eval warns that our tasks override its own; that is the point of shipping them.
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_defaults, metadata=json.loads(metadata_json))


def task_manager(tasks: Sequence[str], metadata: dict[str, Any]) -> Any:
    """A TaskManager that knows our tasks, and lm-eval's own only when a name needs them."""
    need_defaults = not set(tasks) <= set(shipped_tasks())
    manager = _task_manager(need_defaults, json.dumps(metadata, sort_keys=True))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            lines.append(f"unknown task {name!r}" + (f" (close: {', '.join(close)})" if close else ""))
        raise OasstError("; ".join(lines) + "; `lm_eval ls tasks` lists all")
    return manager


def load_tasks(manager: Any, tasks: Sequence[str]) -> list[Any]:
    """Build the lm-eval Task objects (this reads or downloads their data); offline misses become one line."""
    from oasst_tools.hub import assume_offline, hub_reachable

    if not set(tasks) <= set(shipped_tasks()) and not hub_reachable():
        # One probe instead of datasets' half a minute of retries: its cache still serves what it holds.
        assume_offline()
    loaded = []
    for name in tasks:
        try:
            result = manager.load([name])
        except OasstError:
            raise
        except ConnectionError as exc:
            # datasets raises ConnectionError both for HF_DATASETS_OFFLINE and for an unreachable Hub.
            entry = manager.task_index.get(name)
            source = _dataset_path(entry.yaml_path) if entry is not None and entry.yaml_path else None
            local = ", ".join(sorted(shipped_tasks()))
            raise OasstError(
                f"task {name} needs {'the Hub dataset ' + source if source else 'a Hub dataset'}, which is not cached "
                f"and cannot be downloaded offline ({exc}); tasks with local data: {local}"
            ) from None
        loaded.extend(result["tasks"].values())
    return loaded


def _dataset_path(yaml_path: str | Path) -> str | None:
    match = re.search(r"^dataset_path:\s*(\S+)\s*$", Path(yaml_path).read_text(encoding="utf-8"), re.MULTILINE)
    return match.group(1) if match else None
