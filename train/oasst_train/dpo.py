"""`oasst train --method dpo`: DPO on preference pairs with trl's DPOTrainer, over the same QLoRA base, conversation
format, checkpoints and outputs as SFT.

    oasst build --input fixtures/oasst1/en-20.trees.jsonl.gz --pairs best --out data/pairs
    oasst train --config train/recipes/tiny-cpu-dpo.yaml --data data/pairs --out runs/dpo
    oasst train --config train/recipes/tiny-cpu-dpo.yaml --data data/pairs --init-adapter runs/sft --out runs/sft-dpo

The reference model is never a second copy of the base weights. A fresh adapter's reference is the base with the
adapter disabled (trl 1.16 does that for a peft model it wrapped itself). With --init-adapter the SFT adapter is
loaded as the trainable `default` adapter and trl copies it into a frozen `ref` adapter, so the reference is the SFT
model, not the bare base: a bare-base reference would reward the policy for everything SFT taught it
(tests/train/test_dpo.py compares the reference log-probs with the SFT model's own). trl turns dropout off (LoRA's
too), so the policy and the reference are scored alike.

Rows: `prompt` turns ending with a user turn, one `chosen` and one `rejected` assistant reply. With chat-template,
trl renders them with the tokenizer's template; with guanaco, the prompt is Guanaco text ending in the assistant cue
and each reply the completion `" " + reply + EOS`, so stopping is scored too (the pad token is never EOS:
oasst_model.load.set_pad_token). A pair whose prompt alone fills max_length has no reply token left: it is dropped
and counted. Longer pairs are cut (their replies then end without EOS), as trl's collator cuts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oasst_tools.conversation import ASSISTANT_CUE, check_messages, chat_prompt, render_chat, render_guanaco
from oasst_tools.errors import OasstError, OasstInputError
from oasst_train.config import AUTO, TrainConfig

if TYPE_CHECKING:
    from oasst_train.trainer import Built, Data, Prepared

# trl's per-step DPO metrics -> the train_summary.json names of their first and last logged values.
FIGURES = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
           "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}
THREADS_NOT_FOR_DPO = ("holds conversations (`text` / `messages` rows, an `oasst build` without --pairs); method dpo "
                       "trains on preference pairs: build them with `oasst build --pairs best`, or train these with "
                       "--method sft")


@dataclass(frozen=True)
class PairRow:
    """One preference pair as read: the prompt turns, the chosen and the rejected reply, and `file:line`."""

    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]
    where: str


def adopt_init_adapter(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """`cfg` with the LoRA shape (and, when auto, the format) of its --init-adapter, and the line saying what the
    DPO reference is (None for SFT). The adapter is checked here, before anything loads."""
    if cfg.method != "dpo":
        return cfg, None
    if not cfg.init_adapter:
        return cfg, "reference: the base model (the new adapter disabled while scoring)"
    from oasst_model.load import read_adapter_config
    from oasst_model.spec import recorded_format

    folder = Path(cfg.init_adapter)
    adapter = read_adapter_config(folder)  # one line for a missing, damaged or non-LoRA adapter
    targets = adapter["target_modules"]
    targets = tuple(sorted(targets)) if isinstance(targets, list) else (targets,)
    alpha = adapter["lora_alpha"]
    values: dict[str, Any] = {"lora_r": adapter["r"], "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
                              "lora_dropout": float(adapter.get("lora_dropout") or 0.0), "target_modules": targets}
    from oasst_train.config import FIELD_DEFAULTS
    from oasst_train.report import warn

    for name, adopted in values.items():
        given = getattr(cfg, name)
        same = sorted(given) == sorted(adopted) if name == "target_modules" else given == adopted
        if given != FIELD_DEFAULTS[name] and not same:  # set in the recipe or as a flag, and replaced: say so
            warn(f"{name} {_shown(given)} is replaced by {_shown(adopted)} of --init-adapter {folder}: DPO trains "
                 "on the SFT adapter, whose LoRA shape is fixed")
    if cfg.format == AUTO:
        values["format"] = recorded_format(folder)  # DPO continues in the format SFT taught
    return (dataclasses.replace(cfg, **values),
            f"reference: the SFT adapter {folder}, frozen (DPO trains on from it: LoRA r {values['lora_r']}, alpha "
            f"{values['lora_alpha']}, {len(targets)} target modules)")


def _record_base(peft_config: Any, cfg: TrainConfig) -> None:
    """The DPO adapter names the base it trains on: an --init-adapter recording another model would carry that name
    on, and peft's save compares vocabularies against it (a warning per save, embeddings saved for nothing)."""
    from oasst_tools.files import same_path

    named = peft_config.base_model_name_or_path
    if not named or same_path(named, cfg.model):
        return
    from oasst_train.report import warn

    warn(f"--init-adapter {cfg.init_adapter} names {named} as its base; its weights fit {cfg.model}, which DPO trains "
         "on and the new adapter names")
    peft_config.base_model_name_or_path = cfg.model


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def read_pairs(data: str, eval_rows: int = 0) -> dict[str, list[PairRow]]:
    """The pairs of an `oasst build --pairs` folder: train.jsonl and, when there is one, test.jsonl; every row
    checked."""
    from oasst_tools.files import build_split

    path = Path(data)
    train = build_split(path, "train") if path.is_dir() else None
    if train is None:
        what = "does not exist" if not path.exists() else "is not an `oasst build --pairs` folder (no train.jsonl)"
        raise OasstError(f"--data {data} {what}; method dpo reads the train.jsonl (and test.jsonl) of preference "
                         "pairs that `oasst build --pairs best --out FOLDER` writes")
    splits = {"train": _read_pair_rows(train)}
    if not splits["train"]:
        raise OasstError(f"{train}: the train split has no rows")
    test = build_split(path, "test")
    if test is not None:
        splits["test"] = _read_pair_rows(test)[:eval_rows or None]
    return splits


def _read_pair_rows(path: Path) -> list[PairRow]:
    """Rows of one JSONL split of pairs, each checked: a bad one is named with its line."""
    from oasst_tools.files import split_rows

    pairs = []
    same: list[str] = []  # pairs whose two replies are one text: nothing to prefer (eval's guanaco_pairs skips them)
    for n, row in split_rows(path, "prompt, chosen and rejected"):
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing and ("text" in row or "messages" in row):
            if pairs or same:  # the rows before were pairs: this one row is the odd one, named by its line
                raise OasstInputError(path, n, "row is a conversation thread (`text` / `messages`) among "
                                               "preference pairs")
            raise OasstError(f"{path} {THREADS_NOT_FOR_DPO}")
        if missing:
            raise OasstInputError(path, n, f"row has no `{missing[0]}` column (it has: {', '.join(row)})")
        where = f"{path}:{n}"
        try:
            prompt = check_messages(row["prompt"], f"{where}: prompt")
            replies = [check_messages(row[k], f"{where}: {k}") for k in ("chosen", "rejected")]
        except OasstError as exc:
            raise OasstInputError(path, n, str(exc).removeprefix(f"{where}: ")) from None
        if not prompt or prompt[-1]["role"] != "user":
            last = prompt[-1]["role"] if prompt else "nothing"
            raise OasstInputError(path, n, f"`prompt` must end with the user turn the replies answer, not {last}")
        for name, reply in zip(("chosen", "rejected"), replies):
            if len(reply) != 1 or reply[0]["role"] != "assistant":
                given = f"{len(reply)} turns" if len(reply) != 1 else f"one {reply[0]['role']} turn"
                raise OasstInputError(path, n, f"`{name}` must be one assistant message ([{{\"role\": "
                                               f"\"assistant\", \"content\": ...}}]), not {given}")
            if not reply[0]["content"].strip():
                raise OasstInputError(path, n, f"`{name}` content is empty: a reply with no text to prefer or not")
        if replies[0][0]["content"].strip() == replies[1][0]["content"].strip():
            same.append(where)
            continue
        pairs.append(PairRow(prompt, replies[0][0], replies[1][0], where))
    if same:
        from oasst_train.report import warn

        warn(f"{path}: {len(same)} pair(s) whose chosen and rejected replies are the same text were skipped: "
             f"neither can be preferred (first: {same[0]})")
    return pairs


def build_pairs(cfg: TrainConfig, tokenizer: Any, rows: dict[str, list[PairRow]]) -> Data:
    """The train (and test) pairs as trl's DPOTrainer takes them in `cfg.format`, pairs whose prompt fills
    max_length left out; `report` counts them, and the reply tokens scored."""
    from oasst_tools.conversation import resolve_format
    from oasst_train.trainer import Data

    fmt = resolve_format(cfg.format, tokenizer)
    train_set, train_report = pair_dataset(tokenizer, rows["train"], fmt, cfg.max_length)
    if train_set is None:
        raise OasstError(f"no train pair has a reply token within max_length {cfg.max_length}: all "
                         f"{train_report['rows']} prompts are at least that long (first: "
                         f"{train_report['first_dropped']}); use a larger --max-length")
    report = {"train": train_report}
    eval_set = None
    if rows.get("test"):
        eval_set, report["test"] = pair_dataset(tokenizer, rows["test"], fmt, cfg.max_length)
    return Data(train_set, eval_set, fmt, report)


def pair_dataset(tokenizer: Any, pairs: Sequence[PairRow], fmt: str,
                 max_length: int) -> tuple[Any, dict[str, Any]]:
    """A `datasets.Dataset` of prompt / chosen / rejected in `fmt` (None when no pair is left) and its report,
    counted on the tokens trl will score (its rule: the completion starts where prompt and prompt + reply part)."""
    from datasets import Dataset

    report: dict[str, Any] = {"method": "dpo", "format": fmt, "max_length": max_length, "rows": 0,
                              "rows_dropped": 0, "first_dropped": None, "rows_cut": 0, "reply_tokens": 0,
                              "reply_tokens_trained": 0, "rows_end_trained": 0}
    columns: dict[str, list[Any]] = {"prompt": [], "chosen": [], "rejected": []}
    for pair in pairs:
        row, (prompt_len, *reply_lens) = _row_and_lengths(tokenizer, pair, fmt)
        report["rows"] += 1
        if prompt_len >= max_length:
            report["rows_dropped"] += 1
            report["first_dropped"] = report["first_dropped"] or pair.where
            continue
        room = max_length - prompt_len
        report["reply_tokens"] += sum(reply_lens)
        report["reply_tokens_trained"] += sum(min(n, room) for n in reply_lens)
        cut = any(n > room for n in reply_lens)
        report["rows_cut"] += cut
        report["rows_end_trained"] += not cut
        for name in columns:
            columns[name].append(row[name])
    return (Dataset.from_dict(columns) if columns["prompt"] else None), report


def _row_and_lengths(tokenizer: Any, pair: PairRow, fmt: str) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The row trl gets, and (prompt, chosen, rejected) token counts as trl's tokenization gives them."""
    if fmt == "guanaco":
        prompt = render_guanaco(pair.prompt, pair.where) + ASSISTANT_CUE
        row = {"prompt": prompt, **{k: f" {r['content']}{tokenizer.eos_token}" for k, r in
                                    (("chosen", pair.chosen), ("rejected", pair.rejected))}}
        texts = [prompt, prompt + row["chosen"], prompt + row["rejected"]]
        ids = [tokenizer(t, verbose=False)["input_ids"] for t in texts]
    else:
        row = {"prompt": pair.prompt, "chosen": [pair.chosen], "rejected": [pair.rejected]}
        texts = [chat_prompt(tokenizer, pair.prompt, pair.where),
                 render_chat(tokenizer, pair.prompt + [pair.chosen], pair.where),
                 render_chat(tokenizer, pair.prompt + [pair.rejected], pair.where)]
        ids = [tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
    prompt_len = min(_common_prefix(ids[0], ids[1]), _common_prefix(ids[0], ids[2]))
    return row, (prompt_len, len(ids[1]) - prompt_len, len(ids[2]) - prompt_len)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def report_lines(report: dict[str, dict[str, Any]]) -> list[str]:
    """The pair report (per split) as a few plain lines."""
    lines = []
    for split, r in report.items():
        dropped = (f", {r['rows_dropped']:,} dropped: the prompt alone fills them (first: {r['first_dropped']})"
                   if r["rows_dropped"] else "")
        kept = r["rows"] - r["rows_dropped"]
        share = f" ({r['reply_tokens_trained'] / r['reply_tokens']:.1%})" if r["reply_tokens"] else ""
        lines += [f"data {split}: {r['rows']:,} pairs, {r['rows_cut']:,} cut at {r['max_length']} tokens{dropped}",
                  f"  {r['reply_tokens_trained']:,} of {r['reply_tokens']:,} reply tokens scored{share}; pairs whose "
                  f"two replies end (EOS / end of turn) within max_length: {r['rows_end_trained']:,} of {kept:,}"]
    return lines


def build_trainer(cfg: TrainConfig, prepared: Prepared, data: Data, *, fresh: bool) -> Built:
    """The DPOTrainer: a fresh LoRA adapter (reference: the base, adapter disabled), or the --init-adapter one
    (reference: trl's frozen copy of it); the LoRA modules' fused forward."""
    from trl import DPOConfig, DPOTrainer

    from oasst_model.load import load_adapter, lora_target_modules
    from oasst_train.arguments import trainer_config
    from oasst_train.trainer import finish_trainer, lora_config, with_fast_paths

    model, peft_config, start = prepared.model, None, {}
    if cfg.init_adapter:
        model = load_adapter(model, cfg.init_adapter, is_trainable=True)  # the trainable `default` adapter
        targets = sorted(model.peft_config["default"].target_modules)
        _record_base(model.peft_config["default"], cfg)
        # trl 1.16 rounds a quantized model's trainable LoRA weights to bf16 (QLoRA's habit); outside bf16 the policy
        # starts from the SFT weights exactly, as its reference does.
        start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    else:
        targets = list(cfg.target_modules) or lora_target_modules(model)  # given ones: checked by run_training
        peft_config = lora_config(cfg, targets)
    args = trainer_config(DPOConfig, cfg, has_eval=data.eval is not None, fresh=fresh, beta=cfg.beta,
                          loss_type=[cfg.loss_type], max_length=cfg.max_length)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data.train, eval_dataset=data.eval,
                         processing_class=prepared.tokenizer, peft_config=peft_config)
    if cfg.init_adapter and "ref" not in trainer.model.peft_config:
        import trl

        # Without it trl scores the reference with the adapter disabled: the bare base, not the SFT model.
        raise OasstError(f"trl {trl.__version__} did not copy --init-adapter into a reference adapter; DPO from an "
                         "SFT adapter needs trl 1.16's behaviour (pip install 'trl==1.16.*')")
    finish_trainer(trainer, cfg)
    if cfg.precision != "bf16":
        for name, param in trainer.model.named_parameters():
            if name in start:
                param.data = start[name].float()
    return with_fast_paths(cfg, trainer, targets)


def figures(log_history: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """First and last logged reward accuracy, reward margin and chosen / rejected log-probs (each a mean over its
    logging window), train and held-out, under train_summary.json's names."""
    from oasst_train.report import losses

    out: dict[str, float | None] = {}
    for key, name in FIGURES.items():
        for prefix in ("", "eval_"):
            values = [v for _, v in losses(log_history, prefix + key)]
            out[f"{prefix}{name}_first"] = values[0] if values else None
            out[f"{prefix}{name}_last"] = values[-1] if values else None
    return out


def plot(log_history: Sequence[dict[str, Any]], path: Path) -> None:
    """dpo.png: reward accuracy, reward margin and chosen / rejected log-probs against optimizer step."""
    try:
        import matplotlib
    except ImportError:
        return  # plot_losses already warned: loss.png is not written either
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oasst_train.report import losses

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    panels = ((("rewards/accuracies", "accuracy"),), (("rewards/margins", "margin"),),
              (("logps/chosen", "chosen"), ("logps/rejected", "rejected")))
    titles = ("reward accuracy (chosen > rejected)", "reward margin (beta x log-ratio)", "log-prob of the replies")
    for ax, panel, title in zip(axes, panels, titles):
        for key, label in panel:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                points = losses(log_history, prefix + key)
                if points:
                    ax.plot([s for s, _ in points], [v for _, v in points], style,
                            label=f"{label} {'eval' if prefix else 'train'}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dry_run(cfg: TrainConfig, console: Any, origins: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`--dry-run` for method dpo: pairs read, tokenizer loaded, format resolved, pairs counted; prints the report
    and the first pair as the model reads it (prompt dim, chosen green, rejected red). Returns the report."""
    from rich.text import Text

    from oasst_model.load import check_source, load_tokenizer
    from oasst_train.arguments import check_trainer_names
    from oasst_train.preview import run_format

    cfg, reference = adopt_init_adapter(cfg)
    check_source(cfg.model)
    rows = read_pairs(cfg.data, cfg.eval_rows)
    check_trainer_names(cfg, origins)  # imports transformers: after the checks that do not need it
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    cfg, line = run_format(cfg, tokenizer, origins=origins)
    data = build_pairs(cfg, tokenizer, rows)
    for text in [line, reference, *report_lines(data.report)]:
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    pair = rows["train"][0]
    row, _ = _row_and_lengths(tokenizer, pair, cfg.format)
    if cfg.format == "guanaco":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt = chat_prompt(tokenizer, pair.prompt, pair.where)
        chosen, rejected = (render_chat(tokenizer, pair.prompt + [r], pair.where)[len(prompt):]
                            for r in (pair.chosen, pair.rejected))
    console.print(Text.assemble(f"example: {pair.where} (", ("prompt", "dim"), ", ", ("chosen", "bold green"), ", ",
                                ("rejected", "bold red"), "):"), soft_wrap=True)
    console.print(Text.assemble((prompt, "dim"), (chosen, "bold green")), soft_wrap=True)
    console.print(Text.assemble((prompt, "dim"), (rejected, "bold red")), soft_wrap=True)
    return {"format": cfg.format, "data": data.report, "example": pair.where}
