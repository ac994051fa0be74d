"""The adapter's model card (README.md): what it was trained from, how, with what result, and how to load it.

    text = model_card(summary, config, eval_summary=None)
    summary = progress_summary(trainer.state.log_history, step, tokens_seen)   # a checkpoint's card: losses so far

peft writes an empty template (`# Model Card for Model ID`, `[More Information Needed]`) and transformers' Trainer a
card that says "fine-tuned version of [None]"; this one says what a user of the adapter needs. Standard library and
PyYAML only; everything it shows comes from the run's own records (train_config.yaml, train_summary.json, the data
folder's build_report.json and README.md, an eval_summary.json beside the adapter).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from oasst_tools.conversation import ASSISTANT, HUMAN, guanaco_prompt

# How a run's train_config.yaml reruns (its `out:` is the run's own folder, which a new run may not write into).
RERUN = "oasst train --config train_config.yaml --out NEW_OUT"

FORMAT_WORDS = {"guanaco": f"Guanaco (`{HUMAN}...{ASSISTANT}...`)", "chat-template": "the tokenizer's chat template"}
USAGE_PROMPT = "Write a haiku about the sea."
# train_summary.json keys shown in the results table, in order, with their labels.
RESULT_ROWS = (
    ("global_step", "optimizer steps"), ("tokens_seen", "tokens seen (real, not padding)"),
    ("train_loss_first", "train loss, first logged"), ("train_loss_last", "train loss, last logged"),
    ("eval_loss_first", "held-out loss before training"), ("eval_loss_last", "held-out loss after training"),
    ("reward_accuracy_first", "DPO reward accuracy, first logged"),
    ("reward_accuracy_last", "DPO reward accuracy, last logged"),
    ("reward_margin_first", "DPO reward margin, first logged"),
    ("reward_margin_last", "DPO reward margin, last logged"),
    ("logps_chosen_last", "log-prob of the chosen replies, last logged"),
    ("logps_rejected_last", "log-prob of the rejected replies, last logged"),
    ("eval_reward_accuracy_first", "held-out reward accuracy before training"),
    ("eval_reward_accuracy_last", "held-out reward accuracy after training"),
    ("eval_reward_margin_last", "held-out reward margin after training"),
    ("linear4bit_layers", "4-bit linear layers"), ("trainable_parameters", "trainable parameters"),
    ("real_tokens_per_second", "real tokens per second"), ("device", "device"),
)


def model_card(summary: Mapping[str, Any], config: Mapping[str, Any], *,
               eval_summary: Mapping[str, Any] | None = None, out_name: str = "adapter") -> str:
    """README.md for a finished adapter: YAML header, base model, data, training, results, evaluation, usage."""
    base = str(config.get("model") or summary.get("base_model") or "unknown base model")
    data = str(config.get("data") or "")
    header = _front_matter(base, data, str(config.get("method") or "sft"))
    parts = [header, f"# {out_name}: a LoRA adapter for `{base}`, trained with oasst-tools\n",
             _base_section(base, config, summary), _data_section(data, config, summary), _training_section(config),
             _results_section(summary)]
    if eval_summary:
        parts.append(_eval_section(eval_summary))
    parts += [_usage_section(base, out_name, config), _license_section(base)]
    return "\n".join(part.rstrip() + "\n" for part in parts)


def progress_summary(log_history: list[dict[str, Any]], global_step: int, tokens_seen: int) -> dict[str, Any]:
    """The results of a run so far, from the Trainer's log history, under train_summary.json's keys."""
    from oasst_train.report import losses

    train = [v for _, v in losses(log_history, "loss")]
    held_out = [v for _, v in losses(log_history, "eval_loss")]
    return {"global_step": global_step, "tokens_seen": int(tokens_seen),
            "train_loss_first": train[0] if train else None, "train_loss_last": train[-1] if train else None,
            "eval_loss_first": held_out[0] if held_out else None, "eval_loss_last": held_out[-1] if held_out else None}


def _front_matter(base: str, data: str, method: str) -> str:
    import yaml

    meta: dict[str, Any] = {"base_model": base, "library_name": "peft", "license": "apache-2.0",
                            "pipeline_tag": "text-generation",
                            "tags": ["lora", "qlora", "oasst-tools", method, "openassistant"]}
    inputs = _build_report(data).get("inputs") or []
    hub_ids = [i for i in inputs if isinstance(i, str) and "/" in i and not Path(i).exists()]
    if hub_ids:
        meta["datasets"] = hub_ids
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _base_section(base: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    if config.get("load_in_4bit"):
        quant = (f"quantized to 4 bits ({config.get('quant_type', 'nf4')}"
                 f"{', double quantization' if config.get('double_quant') else ''}) with bitsandbytes while "
                 f"training; {summary.get('linear4bit_layers', '?')} linear layers in 4-bit, compute dtype "
                 f"{config.get('compute_dtype')}")
    else:
        quant = f"loaded unquantized in {config.get('compute_dtype')}"
    return (f"## Base model\n\n`{base}`, {quant}. The adapter learned against that base: load the base the same way "
            "(`oasst generate`, `oasst chat` and `oasst eval --adapter` read it from `train_config.yaml`).\n")


def _data_section(data: str, config: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    lines = ["## Data", ""]
    report = _build_report(data)
    if report:
        rows = ", ".join(f"{split} {count:,}" for split, count in report.get("rows", {}).items())
        langs = {lang for by in report.get("rows_by_lang", {}).values() for lang in by}
        inputs = ", ".join(f"`{i}`" for i in report.get("inputs", [])) or "?"
        lines.append(f"`{data}`, built by `oasst build` from {inputs}: "
                     f"{_number(report.get('trees_read', '?'))} trees, {_number(report.get('messages_read', '?'))} "
                     f"messages read; rows {rows or '?'}; languages {', '.join(sorted(langs)) or '?'}.")
        dropped = report.get("dropped") or {}
        if dropped:
            lines.append("Dropped by the selection rules: "
                         + ", ".join(f"{reason} {count:,}" for reason, count in sorted(dropped.items())) + ".")
        how = _build_how(data, report)
        if how:
            lines.append(f"Built with: {how}.")
    elif data:
        lines.append(f"`{data}`.")
    else:
        lines.append("(not recorded)")
    loss = "assistant replies only (human turns masked)" if config.get("loss_on") == "assistant" else "every token"
    if config.get("method") == "dpo":
        loss = "the chosen and the rejected reply of each preference pair (DPO)"
    fmt = config.get("format") or summary.get("format") or "guanaco"
    lines.append(f"Format {FORMAT_WORDS.get(fmt, fmt)}; loss on {loss}; rows cut at {config.get('max_length')} tokens"
                 f"{'; packed' if config.get('packing') else ''}.")
    for split, r in (summary.get("data") or {}).items():
        if isinstance(r, Mapping) and r.get("method") == "dpo" and r.get("reply_tokens"):
            lines.append(f"The {split} split as trained: {r['rows']:,} pairs, {r['rows_cut']:,} cut at "
                         f"{r['max_length']} tokens, {r['rows_dropped']:,} dropped (the prompt alone fills them); "
                         f"{r['reply_tokens_trained']:,} of {r['reply_tokens']:,} reply tokens scored "
                         f"({r['reply_tokens_trained'] / r['reply_tokens']:.1%}).")
        if not isinstance(r, Mapping) or not r.get("loss_tokens"):
            continue
        what = "assistant tokens" if r.get("loss_on") == "assistant" else "tokens"
        lines.append(f"The {split} split as trained: {r['rows']:,} rows, {r['rows_cut']:,} cut at "
                     f"{r['max_length']} tokens, {r['rows_dropped']:,} dropped with no token to learn from; "
                     f"{r['loss_tokens_trained']:,} of {r['loss_tokens']:,} {what} trained "
                     f"({r['loss_tokens_trained'] / r['loss_tokens']:.1%}); {r['rows_end_trained']:,} rows with "
                     "the end of a reply trained.")
    return "\n".join(lines) + "\n"


def _training_section(config: Mapping[str, Any]) -> str:
    import yaml

    batch = config.get("batch_size"), config.get("grad_accum")
    lines = ["## Training", "",
             f"LoRA r {config.get('lora_r')}, alpha {config.get('lora_alpha')}, dropout {config.get('lora_dropout')} "
             f"on {', '.join(config.get('target_modules') or []) or 'every linear layer'}; "
             f"{batch[0]} x {batch[1]} {'pairs' if config.get('method') == 'dpo' else 'sequences'} per optimizer "
             f"step, learning rate {config.get('learning_rate')} "
             f"({config.get('lr_scheduler')}), {config.get('optim')}, precision {config.get('precision')}.",
             *_method_lines(config),
             "", f"The resolved configuration (`train_config.yaml`, rerun with `{RERUN}`):",
             "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _method_lines(config: Mapping[str, Any]) -> list[str]:
    """What the method sentence says: SFT, or DPO with its loss, beta and reference (none for older records)."""
    if config.get("method") == "sft":
        return ["", "Method: supervised fine-tuning (trl's SFTTrainer)."]
    if config.get("method") != "dpo":
        return []
    start = config.get("init_adapter")
    reference = (f"the SFT adapter `{start}` (a frozen copy), which this adapter continues from" if start
                 else "the base model (this adapter disabled)")
    return ["", f"Method: DPO on preference pairs (trl's DPOTrainer), loss type {config.get('loss_type')}, beta "
                f"{config.get('beta')}; reference model: {reference}. Dropout is off while training (trl's choice: "
                "the policy and the reference are scored alike)."]


def _results_section(summary: Mapping[str, Any]) -> str:
    lines = ["## Results", "", "| what | value |", "|---|---|"]
    for key, label in RESULT_ROWS:
        value = summary.get(key)
        if value is None:
            continue
        lines.append(f"| {label} | {_number(value)} |")
    lines += ["", "`loss.png` plots the training and held-out loss; `train_summary.json` has every figure."]
    if summary.get("method") == "dpo":
        lines.append("`dpo.png` plots the reward accuracy, the reward margin and the replies' log-probs; rewards are "
                     "beta x (policy - reference) log-probs, each figure a mean over its logging window.")
    return "\n".join(lines) + "\n"


def _eval_section(eval_summary: Mapping[str, Any]) -> str:
    lines = ["## Evaluation (`oasst eval`)", "", "| label | task | metric | value |", "|---|---|---|---|"]
    for label in ("base", "adapter"):
        for task, metrics in (eval_summary.get(label) or {}).items():
            for metric, value in (metrics or {}).items():
                if isinstance(value, (int, float)) and "stderr" not in metric:
                    lines.append(f"| {label} | {task} | {metric} | {_number(value)} |")
    return "\n".join(lines) + "\n"


def _usage_section(base: str, out_name: str, config: Mapping[str, Any]) -> str:
    if config.get("format") == "chat-template":
        prompt = (f"messages = [{{\"role\": \"user\", \"content\": \"{USAGE_PROMPT}\"}}]\n"
                  "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)\n"
                  "ids = tokenizer(prompt, add_special_tokens=False, return_tensors=\"pt\").input_ids")
    else:
        prompt = (f"prompt = {json.dumps(guanaco_prompt(USAGE_PROMPT))}  # the Guanaco format it learned\n"
                  "ids = tokenizer(prompt, return_tensors=\"pt\").input_ids")
    quant = ""
    if config.get("load_in_4bit"):
        quant = (f"\nbnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{config.get('quant_type', 'nf4')}\",\n"
                 f"                         bnb_4bit_use_double_quant={bool(config.get('double_quant'))},\n"
                 f"                         bnb_4bit_compute_dtype=torch.{config.get('compute_dtype')})")
    load_args = ", quantization_config=bnb" if quant else f", dtype=torch.{config.get('compute_dtype')}"
    return f"""## Use

```console
oasst generate {out_name} --prompt "{USAGE_PROMPT}"
oasst chat {out_name}
oasst eval --adapter {out_name} --tasks hellaswag
```

With peft (Falcon in 4-bit also needs oasst-tools' loader, which quantizes its `FalconLinear` layers):

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
{quant}
base = AutoModelForCausalLM.from_pretrained("{base}"{load_args})
model = PeftModel.from_pretrained(base, "{out_name}")
tokenizer = AutoTokenizer.from_pretrained("{out_name}")
{prompt}
print(tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=128)[0][ids.shape[1]:]))
```
"""


def _license_section(base: str) -> str:
    return ("## License\n\nThe adapter and the training data (OpenAssistant Conversations) are Apache-2.0; the base "
            f"model `{base}` keeps its own license.\n")


def _is_count(value: Any) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_counts(value: Any) -> bool:
    """A JSON object of integers."""
    return isinstance(value, dict) and all(_is_count(v) for v in value.values())


# build_report.json fields the card shows, with the shape each must have; a field of another shape is left out.
_REPORT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "inputs": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "command": lambda v: isinstance(v, str),
    "trees_read": _is_count,
    "messages_read": _is_count,
    "rows": _is_counts,
    "dropped": _is_counts,
    "rows_by_lang": lambda v: isinstance(v, dict) and all(_is_counts(by) for by in v.values()),
}


def _build_report(data: str) -> dict[str, Any]:
    """The shown fields of the data folder's build_report.json that have their shape, or {} when it is not an
    `oasst build` output. The card is made after training: a hand-edited report must not cost the run."""
    if not data:
        return {}
    from oasst_tools.files import optional_json

    report = optional_json(Path(data) / "build_report.json")
    if not isinstance(report, dict):
        return {}
    return {key: value for key, value in report.items() if key in _REPORT_FIELDS and _REPORT_FIELDS[key](value)}


def _build_how(data: str, report: Mapping[str, Any]) -> str:
    """The `oasst build` command that made the data folder (build_report.json's `command`), else the `Filters:` line
    of a card written before builds recorded their command, else ''."""
    command = report.get("command")
    if isinstance(command, str) and command:
        return f"`{command}`"
    try:
        card = (Path(data) / "README.md").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return ""
    for line in card.splitlines():
        if line.startswith("Filters: "):
            return line.removeprefix("Filters: ").strip()
    return ""


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
