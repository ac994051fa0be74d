"""Rich progress bars for `oasst eval`: one while a model's requests are built and one while they are scored, on
stderr and gone when done, in place of lm-eval's tqdm bars (one per task, then one per batch of rolling windows).
Off a terminal nothing is drawn, and lm-eval's bars stay off too.

    with request_bars(lm, "adapter"):
        simple_evaluate(model=lm, ...)

`-v` runs without it: lm-eval draws its own bars, as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

# The LM methods lm-eval's evaluator calls with every request of one type (`getattr(lm, request_type)(requests)`).
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@contextmanager
def request_bars(lm: Any, label: str) -> Iterator[None]:
    """While the block runs: lm-eval's tqdm bars off, and (on a terminal) a bar over the documents turned into
    requests and a bar over the requests `lm` answered."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    with ExitStack() as stack:
        stack.enter_context(progress)
        building = progress.add_task(f"building requests ({label})", total=None)
        scoring = progress.add_task(f"scoring {label}", total=None, visible=False)
        stack.enter_context(_document_bar(progress, building))
        stack.enter_context(_request_bar(lm, progress, building, scoring))
        yield


@contextmanager
def _document_bar(progress: Any, task: Any) -> Iterator[None]:
    """lm-eval's per-task document loop (`tqdm(docs, total=n)` in `Task.build_all_requests`) advances `task`
    instead of drawing a tqdm bar (patch `lm_eval_request_bars`; lm-eval's own bar when its loop changed)."""
    from oasst_model import patches

    if not patches.applies("lm_eval_request_bars"):
        yield
        return
    from lm_eval.api import task as lm_eval_task

    seen = [0]

    def documents(iterable: Iterable[Any], total: int | None = None, **_: Any) -> Iterator[Any]:
        # Each task adds its documents to the one bar, so the total grows task by task.
        seen[0] += total if total is not None else len(iterable)  # type: ignore[arg-type]
        progress.update(task, total=seen[0])
        for item in iterable:
            yield item
            progress.advance(task)

    original = lm_eval_task.tqdm
    lm_eval_task.tqdm = documents
    patches.activated("lm_eval_request_bars", once=True)
    try:
        yield
    finally:
        lm_eval_task.tqdm = original


@contextmanager
def _request_bar(lm: Any, progress: Any, building: Any, scoring: Any) -> Iterator[None]:
    """Every request method of `lm` counts its requests on `scoring` and runs without lm-eval's tqdm bars
    (`disable_tqdm=True`, lm-eval's own argument); FastHFLM also reports each answer as it comes."""
    done = [0, 0]  # requests answered, requests handed over so far

    def counted(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> Any:
            # The evaluator builds every task's requests before it asks for the first answer.
            progress.update(building, visible=False)
            start = done[0]
            done[1] += len(requests)
            progress.update(scoring, total=done[1], visible=True)
            try:
                return method(requests, disable_tqdm=True, **kwargs)
            finally:
                done[0] = start + len(requests)
                progress.update(scoring, completed=done[0])

        return call

    wrapped = [name for name in REQUEST_TYPES if callable(getattr(lm, name, None))]
    for name in wrapped:
        setattr(lm, name, counted(getattr(lm, name)))  # an instance attribute: the class stays lm-eval's
    has_hook = hasattr(lm, "answered")
    if has_hook:
        lm.answered = lambda n: progress.advance(scoring, n)
    try:
        yield
    finally:
        for name in wrapped:
            vars(lm).pop(name, None)
        if has_hook:
            lm.answered = None
