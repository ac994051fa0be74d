"""Issue 4 acceptance on CPU: `oasst eval` equals the `lm_eval` CLI, and training lowers guanaco_test loss."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT = 40


def _lm_eval_cli(model_args: str, tasks_dir: Path, out: Path) -> subprocess.Popen:
    """Start the plain `lm_eval` CLI on the same model, local data (our task dir) and batch size as oasst eval."""
    exe = Path(sys.executable).with_name("lm_eval")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("OASST_EVAL_DATA", None)  # the fixture subset, as for oasst eval below
    return subprocess.Popen(
        [str(exe), "--model", "hf", "--model_args", model_args, "--tasks", "hellaswag",
         "--include_path", str(tasks_dir), "--limit", str(LIMIT), "--batch_size", "8", "--device", "cpu",
         "--output_path", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _printed_metrics(stdout: str) -> dict[str, str]:
    """`acc` and `acc_norm` as lm_eval prints them in its markdown table."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[4] in ("acc", "acc_norm"):
            found[cells[4]] = cells[6]
    return found


@pytest.mark.slow
def test_compare_base_equals_the_lm_eval_cli(oasst, stories: Path, adapter_dir: Path, lm_eval_tasks_dir: Path,
                                              tmp_path: Path) -> None:
    # Both lm_eval runs start first and run alongside ours: each spends ~10 s indexing its task catalogue.
    procs = {
        "base": _lm_eval_cli(f"pretrained={stories},dtype=float32", lm_eval_tasks_dir, tmp_path / "lm_base"),
        "adapter": _lm_eval_cli(f"pretrained={stories},peft={adapter_dir},dtype=float32", lm_eval_tasks_dir,
                                tmp_path / "lm_adapter"),
    }
    result = oasst("eval", "--model", stories, "--adapter", adapter_dir, "--tasks", "hellaswag", "--limit", LIMIT,
                   "--compare-base", "--out", "out")
    assert result.exit_code == 0, result.output
    summary = json.loads(Path("out/eval_summary.json").read_text())

    for label, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        printed = _printed_metrics(stdout)
        ours = summary[label]["hellaswag"]
        assert set(printed) == {"acc", "acc_norm"}, stdout
        for metric, text in printed.items():
            decimals = len(text.partition(".")[2])
            assert f"{ours[metric]:.{decimals}f}" == text, (label, metric, ours[metric], text)
        (theirs_file,) = (tmp_path / f"lm_{label}").rglob("results_*.json")
        theirs = json.loads(theirs_file.read_text())["results"]["hellaswag"]
        assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"], label
        assert ours["n"] == LIMIT
        ours_file = json.loads(Path(f"out/results_{label}.json").read_text())
        assert ours_file["results"]["hellaswag"]["acc,none"] == theirs["acc,none"]

    assert summary["difference"]["hellaswag"]["acc"]["diff"] == pytest.approx(
        summary["adapter"]["hellaswag"]["acc"] - summary["base"]["hellaswag"]["acc"])
    assert Path("out/eval.png").read_bytes()[:4] == b"\x89PNG"
    # The table ends the output: one row per metric, both models and their difference.
    value = r"[\d.]+ ± [\d.]+"
    row = rf"hellaswag\s+│\s+acc\s+│\s+{value}\s+│\s+{value}\s+│\s+[+-]{value}\s+│\s+40"
    assert re.search(row, result.stdout), result.stdout


@pytest.mark.slow
def test_guanaco_test_loss_is_lower_with_the_adapter(oasst, stories: Path, adapter_dir: Path,
                                                     guanaco_dir: Path) -> None:
    result = oasst("eval", "--model", stories, "--adapter", adapter_dir, "--tasks", "guanaco_test",
                   "--data", guanaco_dir, "--compare-base", "--out", "out")
    assert result.exit_code == 0, result.output
    summary = json.loads(Path("out/eval_summary.json").read_text())
    base, adapter = summary["base"]["guanaco_test"], summary["adapter"]["guanaco_test"]
    assert base["n"] == adapter["n"] == 17
    assert adapter["token_loss"] < base["token_loss"]
    assert adapter["token_perplexity"] < base["token_perplexity"]
    assert adapter["token_perplexity"] == pytest.approx(2.718281828 ** adapter["token_loss"], rel=1e-9)
    diff = summary["difference"]["guanaco_test"]["token_loss"]
    # Lower with room to spare: more than three standard errors of the paired difference.
    assert diff["diff"] < -3 * diff["stderr"]
    assert set(summary) == {"base", "adapter", "difference", "settings", "versions"}
    assert summary["settings"]["data_used"]["data"] == str((guanaco_dir / "test.jsonl").resolve())
    # Peak memory under train_summary.json's name and measure (on a CPU: the process's peak resident memory).
    assert summary["settings"]["peak_memory_bytes"] > 2**20 and "peak_gpu_memory_gib" not in summary["settings"]
