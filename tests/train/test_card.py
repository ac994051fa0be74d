"""The adapter's model card says what a user needs: base model and how it was loaded, data, config, results, usage."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from oasst_train.card import model_card
from tests.train.conftest import GUANACO


def _card(**config: object) -> str:
    summary = {"global_step": 60, "tokens_seen": 123456, "train_loss_first": 5.25, "train_loss_last": 3.5,
               "eval_loss_first": 4.7, "eval_loss_last": 3.2, "linear4bit_layers": 35, "trainable_parameters": 92480,
               "device": "cpu (x86_64, 2 threads)"}
    base = {"model": "/models/stories260K", "data": str(GUANACO), "load_in_4bit": True, "quant_type": "nf4",
            "double_quant": True, "compute_dtype": "float32", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "batch_size": 8, "grad_accum": 1, "learning_rate": 0.005,
            "lr_scheduler": "constant", "optim": "adamw_torch", "precision": "fp32", "loss_on": "assistant",
            "max_length": 256, "packing": False}
    return model_card(summary, base | config, out_name="runs/stories")


def test_card_names_base_data_config_results_usage_and_license() -> None:
    card = _card()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["base_model"] == "/models/stories260K" and header["library_name"] == "peft"
    assert header["license"] == "apache-2.0"
    report = json.loads((GUANACO / "build_report.json").read_text())
    # The data section carries the build's own counts: trees, messages, rows per split, what was dropped.
    assert f"{report['trees_read']:,} trees, {report['messages_read']:,} messages read; rows train 171, test 17" in card
    assert "deleted 40, spam 43" in card
    assert "quantized to 4 bits (nf4, double quantization)" in card and "35 linear layers in 4-bit" in card
    assert "| held-out loss before training | 4.7000 |" in card and "| held-out loss after training | 3.2000 |" in card
    assert "| optimizer steps | 60 |" in card and "| tokens seen (real, not padding) | 123,456 |" in card
    resolved = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert resolved["learning_rate"] == 0.005 and resolved["target_modules"] == ["q_proj", "v_proj"]
    assert "oasst generate runs/stories --prompt" in card and 'PeftModel.from_pretrained(base, "runs/stories")' in card
    assert "BitsAndBytesConfig(load_in_4bit=True" in card
    assert "## License" in card
    for template_leftover in ("[More Information Needed]", "[None]", "Model Card for Model ID"):
        assert template_leftover not in card


def test_a_16_bit_run_says_so_and_loads_without_bitsandbytes() -> None:
    card = _card(load_in_4bit=False, compute_dtype="bfloat16")
    assert "loaded unquantized in bfloat16" in card
    assert "BitsAndBytesConfig(" not in card.split("import torch")[1] and "dtype=torch.bfloat16" in card


def test_eval_results_beside_the_adapter_are_shown(tmp_path: Path) -> None:
    card = model_card({"global_step": 1}, {"model": "m", "data": ""}, eval_summary={
        "base": {"hellaswag": {"acc": 0.25, "acc_stderr": 0.01}},
        "adapter": {"hellaswag": {"acc": 0.3}}})
    assert "| base | hellaswag | acc | 0.2500 |" in card and "| adapter | hellaswag | acc | 0.3000 |" in card
    assert "acc_stderr" not in card


def test_card_says_how_the_data_was_built(tmp_path: Path) -> None:
    import shutil

    report = json.loads((GUANACO / "build_report.json").read_text())
    assert f"Built with: `{report['command']}`." in _card()
    # A folder built before builds recorded their command: the card's Filters line, as it was written then.
    old = tmp_path / "old"
    shutil.copytree(GUANACO, old)
    del report["command"], report["settings"]
    (old / "build_report.json").write_text(json.dumps(report))
    (old / "README.md").write_text("# card\n\nFilters: `{'mode': 'top-rank', 'langs': ['en']}`\n")
    assert "Built with: `{'mode': 'top-rank', 'langs': ['en']}`." in _card(data=str(old))


def test_a_hand_edited_build_report_leaves_out_its_bad_fields_and_never_fails_the_card(tmp_path: Path) -> None:
    """The card is written after training and at every checkpoint: a build_report.json with fields of the wrong
    shape (or not JSON, or nested past the parser's limit) must give a card that leaves them out, not an error
    that loses the finished run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(GUANACO, data)
    report = json.loads((data / "build_report.json").read_text())
    good = dict(report)
    for bad in ({"trees_read": "many"}, {"rows": [1, 2]}, {"rows_by_lang": {"train": ["en"]}},
                {"dropped": {"spam": "43"}}, {"inputs": "one.jsonl"}, {"messages_read": True}, {"command": 7}):
        (data / "build_report.json").write_text(json.dumps(good | bad))
        card = _card(data=str(data))
        (key,) = bad
        assert "## Data" in card and "## Results" in card, key
        if key == "trees_read":
            assert f"? trees, {report['messages_read']:,} messages read; rows train 171, test 17" in card
        if key == "rows":
            assert "; rows ?;" in card
        if key == "dropped":
            assert "Dropped by the selection rules" not in card
        if key == "inputs":
            assert f"built by `oasst build` from ?: {report['trees_read']:,} trees" in card
    for text in ('{"rows": ' * 100_000 + "1" + "}" * 100_000, "not json", "[1, 2]"):
        (data / "build_report.json").write_text(text)
        assert f"`{data}`." in _card(data=str(data))
