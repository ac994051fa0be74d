"""`oasst stats` and `oasst show`: look at an export before building from it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import click

from oasst_tools.cli.params import argument_or_option, switch
from oasst_tools.errors import NotContiguousError, OasstError, printable
from oasst_tools.read import read_trees
from oasst_tools.schema import Tree

# `oasst show` draws at least this many levels, more on a wide terminal (four columns a level); a deeper thread
# is cut with a line saying how much is left: rich indents every level, so 5,000 levels would be 20,000 columns
# wide (and take seconds), with no room left for the text.
SHOW_DEPTH = 16


def _tree_of_message(source: str, message_id: str) -> str | None:
    """The id of the tree holding message `message_id` (an id given where a tree id was asked), or None; reads
    `source` again, so a pipe (read once already) finds nothing."""
    from oasst_tools.walk import iter_messages

    for tree in _trees(source):
        if any(m.message_id == message_id for m in iter_messages(tree.prompt)):
            return tree.message_tree_id
    return None


def _trees(source: str) -> Iterator[Tree]:
    """The trees of `source` as `build` reads them: an interleaved flat file is read again, grouped in memory (the
    trees of the first pass were not the one looked for, or the caller would have stopped)."""
    try:
        yield from read_trees(source)
    except NotContiguousError:
        yield from read_trees(source, buffered=True)


def _input_argument(then: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The export of stats and show: `INPUT`, or `--input PATH` as `oasst build` takes it."""
    return argument_or_option("input", "PATH", "an OASST export", dest="source", then=then,
                              help="The export, as `oasst build --input` takes it (instead of INPUT).")


@click.command()
@_input_argument()
@switch("--json", "json_", help="Print the counts as JSON instead of tables.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at the first bad record; skip: count what can be read.")
def stats(source: str, json_: bool, on_error: str) -> None:
    """Count trees, messages, states, languages, depth and branching of an export.

    \b
        oasst stats ../shared/data/oasst1/validation-en.messages.jsonl
        oasst stats ../shared/data/oasst1/en-100-2023-03.trees.jsonl --json
    """
    from oasst_tools.cli.build import warn_read
    from oasst_tools.read import ReadReport
    from oasst_tools.stats import forest_stats

    report = ReadReport()
    try:
        result = forest_stats(read_trees(source, on_error=on_error, report=report))  # type: ignore[arg-type]
    except NotContiguousError:  # interleaved flat file: count again, grouped in memory (as `build` does)
        report = ReadReport()
        result = forest_stats(read_trees(source, on_error=on_error, report=report,  # type: ignore[arg-type]
                                         buffered=True))
    report.settle_split_trees(on_error)  # type: ignore[arg-type]
    warn_read(report)  # what the counts leave out, as `build` says it
    # The same names as build_report.json: messages the counts leave out.
    lost = {"orphaned_messages": report.orphaned, "trees_without_prompt": report.without_prompt,
            "skipped": dict(sorted(report.skipped.items())), "skipped_messages": report.skipped_messages}
    if json_:
        click.echo(json.dumps(result.to_dict() | lost, indent=2))
        return
    from rich.columns import Columns
    from rich.table import Table
    from rich.text import Text

    from oasst_tools.cli.console import stdout

    def table(title: str, key: str, rows: list[tuple[object, int]]) -> Table:
        t = Table(title=title, header_style="bold")
        t.add_column(key)
        t.add_column("count", justify="right")
        for name, value in rows:
            t.add_row(Text(printable(str(name))), f"{value:,}")  # Text: states and languages come from the data
        return t

    overview = [("trees", result.trees), ("messages", result.messages), ("leaves", result.leaves),
                *sorted(result.roles.items()), *sorted(result.flags.items()),
                *[(f"{what}, not counted", lost[name]) for name, what in (
                    ("orphaned_messages", "orphaned"), ("trees_without_prompt", "trees with a null prompt"),
                    ("skipped_messages", "skipped")) if lost[name]]]
    stdout.print(Columns([
        table("overview", "what", overview),
        table("tree states", "state", result.states.most_common()),
        table("languages", "root prompt", result.tree_langs.most_common(12)),
        table("depth", "messages", sorted(result.depths.items())),
        table("branching", "replies", sorted(result.branching.items())),
    ]))


@click.command()
@_input_argument(then="tree_id")
@click.option("--width", type=click.IntRange(min=1), default=70, show_default=True,
              help="Characters of each message text shown.")
def show(source: str, tree_id: str, width: int) -> None:
    """Draw one tree with roles, ranks, flags and labels.

    \b
        oasst show ../shared/data/oasst1/validation-en.messages.jsonl e0cf4fa2-e944-44fb-b502-11f155062092
    """
    from rich.text import Text
    from rich.tree import Tree as RichTree

    from oasst_tools.cli.console import stdout
    from oasst_tools.filters import Selection, prune
    from oasst_tools.walk import best_thread, rank_key

    tree = next((t for t in _trees(source) if t.message_tree_id == tree_id), None)
    if tree is None:
        holder = _tree_of_message(source, tree_id)
        hint = f" ({tree_id} is a message of tree {holder}: show that tree)" if holder else ""
        raise OasstError(f"{source}: no tree with message_tree_id {tree_id}{hint}")
    pruned = prune(tree.prompt, Selection())
    best = {m.message_id for m in best_thread(pruned)} if pruned is not None else set()

    def label(message) -> Text:  # noqa: ANN001 - a Message; local helper
        # Text pieces, never markup: message texts, labels and ids are data (`[bold]`, `[/]`, `:smile:` print as is).
        text = printable(message.text.replace("\n", " "))
        text = text if len(text) <= width else text[: width - 1] + "…"
        head = Text()
        if message.message_id in best:
            head.append("★ ", style="green")
        head.append(message.role, style="bold")
        if message.rank is not None:
            head.append(f" · rank {message.rank}")
        for flag, on in (("deleted", message.deleted), ("spam", message.review_result is False)):
            if on:
                head.append(" · ")
                head.append(flag, style="red")
        if message.synthetic:
            head.append(" · ")
            head.append("synthetic", style="yellow")
        labels = printable(", ".join(f"{k} {_number(v)}" for k, v in sorted(message.labels.items(), key=_key) if v))
        if labels:
            head.append(f" ({labels})", style="dim")
        head.append(": ")
        head.append(text)
        return head

    root = RichTree(Text.assemble((printable(tree.message_tree_id), "bold"),
                                  printable(f" · {tree.tree_state} · {tree.prompt.lang}")))
    deepest = max(SHOW_DEPTH, (stdout.width - 20) // 4)
    stack = [(tree.prompt, root, 1)]
    while stack:
        message, node, level = stack.pop()
        branch = node.add(label(message))
        if level == deepest and message.replies:
            below = _count_below(message)
            branch.add(Text(f"… {below:,} more message(s) below, not drawn (more than {deepest} levels)",
                            style="dim"))
            continue
        stack.extend((reply, branch, level + 1) for reply in reversed(sorted(message.replies, key=rank_key)))
    stdout.print(root)
    stdout.print(Text.assemble(("★", "green"), " the thread --top-rank selects (after deleted and spam messages are "
                                               "dropped)"))


def _number(value: object) -> str:
    """A label value for display: two decimals for a number, else as it is (`oasst show` draws bad data too)."""
    return f"{value:.2f}" if type(value) in (int, float) else repr(value)


def _key(item: tuple[object, object]) -> str:
    return str(item[0])


def _count_below(message) -> int:  # noqa: ANN001 - a Message
    count, stack = 0, list(message.replies)
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.replies)
    return count
