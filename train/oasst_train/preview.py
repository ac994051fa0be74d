"""What a run trains on, said before it trains: the conversation format, the data report, one example with its mask.

    oasst train --config train/recipes/tiny-cpu.yaml --data fixtures/guanaco-en --dry-run

`--dry-run` loads the tokenizer only (no weights), encodes the rows exactly as the run would (`trainer.build_data`),
prints the report and one example whose trained tokens are bold green and masked ones dim, and writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from oasst_tools.errors import OasstError
from oasst_train.config import AUTO, TrainConfig, given_from

TRAINED_STYLE, MASKED_STYLE = "bold green", "dim"
# Rows looked at for an example that fits in max_length (its end, and how it is trained, then shows).
EXAMPLE_SCAN = 200


def run_format(cfg: TrainConfig, tokenizer: Any, saved: dict[str, Any] | None = None,
               origins: Mapping[str, str] | None = None) -> tuple[TrainConfig, str]:
    """`cfg` with its format resolved for `tokenizer` (a resumed run keeps the one in `saved`, its
    train_config.yaml), and the line that says which and why (a given format: where from, in `origins`' words)."""
    from oasst_tools.conversation import has_chat_template, resolve_format

    if saved is not None:
        # Runs from before the format was recorded trained Guanaco, the only format then.
        recorded = saved.get("format", "guanaco")
        if cfg.format not in (AUTO, recorded):
            raise OasstError(f"--resume: the config differs from the run in {cfg.out}: "
                             f"format {recorded!r} -> {cfg.format!r}")
        fmt, why = resolve_format(recorded, tokenizer), "resumed run"
    elif cfg.format == AUTO:
        fmt = resolve_format(AUTO, tokenizer)
        why = f"auto: the tokenizer {'has a' if has_chat_template(tokenizer) else 'has no'} chat template"
    else:
        fmt, why = resolve_format(cfg.format, tokenizer), given_from((origins or {}).get("format"))
        if cfg.method == "dpo" and cfg.init_adapter:
            from oasst_model.spec import recorded_format

            try:
                adopted = recorded_format(cfg.init_adapter) == fmt  # taken from it when auto (adopt_init_adapter)
            except OasstError:  # a damaged record: the line is all it would change
                adopted = False
            if adopted:
                why = "as --init-adapter was trained"
    return dataclasses.replace(cfg, format=fmt), f"format: {fmt} ({why})"


def report_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    """The data report (data.DataReport.to_dict per split) as a few plain lines."""
    lines = []
    for split, r in report.items():
        what = "assistant tokens" if r["loss_on"] == "assistant" else "tokens"
        dropped = (f", {r['rows_dropped']:,} dropped with no token to learn from (first: {r['first_dropped']})"
                   if r["rows_dropped"] else "")
        share = f" ({r['share_trained']:.1%})" if r["share_trained"] is not None else ""
        lines += [
            f"data {split}: {r['rows']:,} rows, {r['rows_cut']:,} cut at {r['max_length']} tokens{dropped}",
            f"  {r['loss_tokens_trained']:,} of {r['loss_tokens']:,} {what} trained{share}, "
            f"{r['loss_tokens_lost']:,} lost to the cut; rows whose reply end (EOS / end of turn) is trained: "
            f"{r['rows_end_trained']:,} of {r['rows']:,}",
        ]
    return lines


def example_text(tokenizer: Any, ids: Sequence[int], mask: Sequence[int]) -> Any:
    """Tokens as text (special tokens shown), trained ones bold green, masked ones dim: a rich Text, so markup in
    the data is shown as written."""
    from rich.text import Text

    text = Text()
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and mask[end] == mask[start]:
            end += 1
        # The run decoded in context: decoding it alone drops the space a sentencepiece word starts with.
        before = tokenizer.decode(list(ids[:start]), skip_special_tokens=False)
        upto = tokenizer.decode(list(ids[:end]), skip_special_tokens=False)
        piece = upto[len(before):] if upto.startswith(before) else tokenizer.decode(list(ids[start:end]))
        text.append(piece, style=TRAINED_STYLE if mask[start] else MASKED_STYLE)
        start = end
    return text


def pick_example(tokenizer: Any, rows: Sequence[Any], cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(row, encoded, cut to max_length) of the first row with a token to learn from, preferring one that fits."""
    from oasst_tools.conversation import encode

    first = None
    for row in rows[:EXAMPLE_SCAN]:
        full = encode(tokenizer, row.conversation(cfg.format), cfg.format, cfg.loss_on == "assistant", row.where)
        kept = full.cut(cfg.max_length)
        if not any(kept.mask):
            continue
        if len(kept.ids) == len(full.ids):
            return row, full, kept
        first = first or (row, full, kept)
    if first is None:
        raise OasstError(f"no row among the first {EXAMPLE_SCAN} has a token to learn from")
    return first


def dry_run(cfg: TrainConfig, console: Any, origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything a run does before loading the model: rows read, tokenizer loaded, format resolved, rows encoded
    and counted; prints the format, the data report and one example on `console`. Returns the report."""
    from rich.text import Text

    from oasst_model.load import check_source, load_tokenizer
    from oasst_train.arguments import check_trainer_names
    from oasst_train.data import read_rows
    from oasst_train.trainer import build_data

    if cfg.method == "dpo":
        from oasst_train.dpo import dry_run as dry_run_pairs

        return dry_run_pairs(cfg, console, origins)
    check_source(cfg.model)
    rows = read_rows(cfg.data, cfg.eval_rows)
    check_trainer_names(cfg, origins)  # imports transformers: after the checks that do not need it
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    cfg, line = run_format(cfg, tokenizer, origins=origins)
    data = build_data(cfg, tokenizer, rows)
    # soft_wrap: lines and the example as they are, for the terminal to wrap (figures stay whole in a log).
    for text in [line, *report_lines(data.report)]:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    row, full, kept = pick_example(tokenizer, rows["train"], cfg)
    cut = f", cut from {len(full.ids):,}" if len(kept.ids) < len(full.ids) else ""
    console.print(Text.assemble(f"example: {row.where} ({len(kept.ids):,} tokens{cut}; ",
                                ("trained", TRAINED_STYLE), ", ", ("masked", MASKED_STYLE), "):"), soft_wrap=True)
    console.print(example_text(tokenizer, kept.ids, kept.mask), soft_wrap=True)
    return {"format": cfg.format, "data": data.report, "example": row.where}
