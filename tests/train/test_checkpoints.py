"""Which checkpoint `--resume` takes: the newest complete one by step number (5 < 10, not "10" < "5"), never a
damaged one, with one warning line that names what it skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from oasst_train.checkpoints import checkpoint_folders, incomplete_reason, last_complete_checkpoint
from tests.hostile import assert_unchanged, snapshot
from tests.train.conftest import GUANACO, RECIPES, STORIES_STEPS, read_summary
from tests.train.test_hostile import fake_checkpoint


def test_checkpoints_are_ordered_by_step_number_not_as_strings(tmp_path: Path) -> None:
    for step in (5, 10, 9, 100):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "checkpoint-final").mkdir()  # not a step: ignored
    assert [step for step, _ in checkpoint_folders(tmp_path)] == [5, 9, 10, 100]
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-100"
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-100")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-9")
    # As strings "checkpoint-5" sorts after "checkpoint-10": the newest would look like step 5.
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-10"


def test_incomplete_reason_never_raises_on_a_file_it_cannot_read(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path, 3)
    (folder / "trainer_state.json").unlink()
    (folder / "trainer_state.json").mkdir()  # a folder where a file should be
    assert incomplete_reason(folder) == "trainer_state.json missing"
    (folder / "trainer_state.json").rmdir()
    (folder / "trainer_state.json").write_text('{"global_step": 3}')
    (folder / "adapter_model.safetensors").write_bytes((10).to_bytes(8, "little") + b'{"x": 1}  ')
    assert incomplete_reason(folder) == ("adapter_model.safetensors: not a safetensors file (tensor 'x' has no valid "
                                         "data_offsets)")


@pytest.mark.slow
def test_resume_from_a_run_whose_newest_checkpoint_is_damaged_warns_once_and_finishes(
        oasst, stories_run: Path, stories: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stories_run, out)
    newest = out / "checkpoints" / f"checkpoint-{STORIES_STEPS}"
    previous = STORIES_STEPS // 2
    assert last_complete_checkpoint(out) == newest and (out / "checkpoints" / f"checkpoint-{previous}").is_dir()
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # cut inside the tensors, as a full disk leaves it
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--max-steps", previous + 1, "--save-steps", 30, "--resume", "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"warning: --resume: skipping checkpoint-{STORIES_STEPS}: adapter_model.safetensors: "
                                  "truncated safetensors file (the header promises "), warnings
    assert warnings[0].endswith(f"; resuming from checkpoint-{previous}"), warnings
    summary = read_summary(out)
    assert summary["resumed_from"] == f"checkpoint-{previous}" and summary["global_step"] == previous + 1


@pytest.mark.slow
def test_resume_with_a_damaged_saved_config_is_one_line(oasst, stories_run: Path, stories: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stories_run, out)
    (out / "train_config.yaml").write_text("model: [unclosed\n")
    before = snapshot(tmp_path)
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--resume", "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {out / 'train_config.yaml'}:2: not valid YAML (expected ',' or ']', but "
                                     "got '<stream end>'); it is the config this run "
                                     "was started with: restore it, or start a new run in another --out")
    assert_unchanged(before, tmp_path)
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == STORIES_STEPS
