"""`oasst stats` and `oasst show`: look at an export before building from it."""

from __future__ import annotations

import json

import click

from oasst_tools.errors import OasstError
from oasst_tools.read import read_trees


@click.command()
@click.argument("source", metavar="INPUT")
@click.option("--json", "json_", is_flag=True, help="Print the counts as JSON instead of tables.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at the first bad record; skip: count what can be read.")
def stats(source: str, json_: bool, on_error: str) -> None:
    """Count trees, messages, states, languages, depth and branching of an export.

    \b
        oasst stats ../shared/data/oasst1/validation-en.messages.jsonl
        oasst stats ../shared/data/oasst1/en-100-2023-03.trees.jsonl --json
    """
    from oasst_tools.stats import forest_stats

    result = forest_stats(read_trees(source, on_error=on_error))  # type: ignore[arg-type]
    if json_:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    from rich.columns import Columns
    from rich.table import Table

    from oasst_tools.cli.console import stdout

    def table(title: str, key: str, rows: list[tuple[str, int]]) -> Table:
        t = Table(title=title, header_style="bold")
        t.add_column(key)
        t.add_column("count", justify="right")
        for key, value in rows:
            t.add_row(str(key), f"{value:,}")
        return t

    overview = [("trees", result.trees), ("messages", result.messages), ("leaves", result.leaves),
                *sorted(result.roles.items()), *sorted(result.flags.items())]
    stdout.print(Columns([
        table("overview", "what", overview),
        table("tree states", "state", result.states.most_common()),
        table("languages", "root prompt", result.tree_langs.most_common(12)),
        table("depth", "messages", sorted(result.depths.items())),
        table("branching", "replies", sorted(result.branching.items())),
    ]))


@click.command()
@click.argument("source", metavar="INPUT")
@click.argument("tree_id")
@click.option("--width", type=int, default=70, show_default=True, help="Characters of each message text shown.")
def show(source: str, tree_id: str, width: int) -> None:
    """Draw one tree with roles, ranks, flags and labels.

    \b
        oasst show ../shared/data/oasst1/validation-en.messages.jsonl e0cf4fa2-e944-44fb-b502-11f155062092
    """
    from rich.markup import escape
    from rich.tree import Tree as RichTree

    from oasst_tools.cli.console import stdout
    from oasst_tools.filters import Selection, prune
    from oasst_tools.walk import best_thread, rank_key

    tree = next((t for t in read_trees(source) if t.message_tree_id == tree_id), None)
    if tree is None:
        raise OasstError(f"{source}: no tree with message_tree_id {tree_id}")
    pruned = prune(tree.prompt, Selection())
    best = {m.message_id for m in best_thread(pruned)} if pruned is not None else set()

    def label(message) -> str:  # noqa: ANN001 - a Message; local helper
        text = message.text.replace("\n", " ")
        text = text if len(text) <= width else text[: width - 1] + "…"
        parts = [f"[bold]{message.role}[/]"]
        if message.rank is not None:
            parts.append(f"rank {message.rank}")
        if message.deleted:
            parts.append("[red]deleted[/]")
        if message.review_result is False:
            parts.append("[red]spam[/]")
        if message.synthetic:
            parts.append("[yellow]synthetic[/]")
        labels = ", ".join(f"{k} {v:.2f}" for k, v in sorted(message.labels.items()) if v)
        head = " · ".join(parts) + (f" [dim]({escape(labels)})[/]" if labels else "")
        mark = "[green]★[/] " if message.message_id in best else ""
        return f"{mark}{head}: {escape(text)}"

    root = RichTree(f"[bold]{tree.message_tree_id}[/] · {tree.tree_state} · {tree.prompt.lang}")
    stack = [(tree.prompt, root)]
    while stack:
        message, node = stack.pop()
        branch = node.add(label(message))
        stack.extend((reply, branch) for reply in reversed(sorted(message.replies, key=rank_key)))
    stdout.print(root)
    stdout.print("[green]★[/] the thread --top-rank selects (after deleted and spam messages are dropped)")
