"""TrainConfig: defaults < YAML recipe < flags, unknown keys reported together, shipped recipes valid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tests.train.conftest import RECIPES, REPO, error_line

from oasst_train.config import TrainConfig, resolve_config
from oasst_tools.errors import OasstError


def test_flags_override_recipe_which_overrides_defaults(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndata: d\nout: o\nlora_r: 8\nlearning_rate: 1.0e-3\ntarget_modules: [q, v]\n")
    cfg = resolve_config(recipe, {"lora_r": 4, "max_steps": None, "load_in_4bit": False})
    assert (cfg.lora_r, cfg.learning_rate, cfg.target_modules, cfg.load_in_4bit) == (4, 1e-3, ("q", "v"), False)
    assert cfg.lora_alpha == TrainConfig().lora_alpha  # untouched field keeps its default
    with pytest.raises(AttributeError):
        cfg.lora_r = 2  # type: ignore[misc]  # frozen: resolved once, never mutated


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_is_valid_and_starts_with_its_command(recipe: Path) -> None:
    if recipe.name.startswith("accelerate"):
        pytest.skip("accelerate's own config, not a TrainConfig")
    first = recipe.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and ("oasst train" in first or "accelerate launch" in first)
    cfg = resolve_config(recipe, {"data": "d", "out": "o"})
    assert cfg.model


def test_unknown_config_keys_are_all_listed_in_one_error(oasst, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: m\nlora_rank: 8\nlr: 0.1\nmax_seq_length: 512\nlearning-rate: 0.1\n")
    result = oasst("train", "--config", recipe, "--data", "d", "--out", "o")
    # Each with the key it most likely meant, where one is close enough.
    assert error_line(result) == (f"error: {recipe}: unknown config keys: learning-rate (learning_rate?), lora_rank "
                                  "(lora_r?), lr, max_seq_length (max_length?) (see `oasst train --help` for the known "
                                  "ones)")
    assert not (tmp_path / "o").exists()


def test_wrong_value_type_names_the_key(oasst, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: m\nlora_r: eight\n")
    assert error_line(oasst("train", "--config", recipe)) == \
        f"error: {recipe}:2: lora_r must be a whole number, not 'eight'"


def test_missing_required_values_are_named(oasst) -> None:
    assert error_line(oasst("train", "--model", "m")) == (
        "error: missing data, out: give --data --out or set them in --config")


def test_written_config_round_trips(tmp_path: Path) -> None:
    from oasst_train.config import to_dict

    cfg = resolve_config(RECIPES / "tiny-cpu.yaml", {"data": "d", "out": "o", "target_modules": "q_proj,v_proj"})
    saved = tmp_path / "c.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg)))
    assert resolve_config(saved, {}) == cfg


def test_pad_to_multiple_of_may_equal_max_length() -> None:
    # One past it is refused (tests/train/test_hostile.py); at it, every batch is padded to max_length, which holds.
    cfg = resolve_config(RECIPES / "tiny-cpu.yaml", {"data": "d", "out": "o", "max_length": 256,
                                                     "pad_to_multiple_of": 256})
    assert (cfg.max_length, cfg.pad_to_multiple_of) == (256, 256)


def test_help_lists_commands_without_importing_torch() -> None:
    code = ("import sys; from oasst_tools.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--no-load-in-4bit" in out and "--resume" in out and "--max-steps" in out
    assert "--no-4bit" not in out and "--lr " not in out  # the former spellings still work, hidden
    assert out.strip().endswith("HEAVY []")


@pytest.mark.parametrize(("recipe", "args", "named"), [
    ("tiny-cpu", ("--data", "data/nosuch"), "data/nosuch"),
    ("tiny-cpu", ("--data", "owner/not-cached"), "owner/not-cached"),
    ("tiny-cpu", ("--model", "owner/not-cached"), "owner/not-cached"),
    ("tiny-cpu", ("--data", "data/nosuch", "--dry-run"), "data/nosuch"),
    ("tiny-cpu-dpo", ("--data", "data/nosuch"), "data/nosuch")])
def test_a_missing_path_or_uncached_hub_id_fails_before_torch_loads(tmp_path: Path, recipe: str,
                                                                    args: tuple[str, ...], named: str) -> None:
    """The README's promise: a typo'd path or an id that is not cached is one line within 2 s, so nothing heavy may
    load before those checks (an optimizer-name check that imported transformers first made it 10 s)."""
    argv = ["train", "--config", str(RECIPES / f"{recipe}.yaml"), "--data", "fixtures/guanaco-en", *args,
            "--out", str(tmp_path / "out")]
    code = ("import sys; from oasst_tools.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as exc:\n    print('EXIT', exc.code)\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.stdout.split() == ["EXIT", "1", "HEAVY", "[]"], proc.stdout + proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: ") and named in last and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_fused_lora_refinement_without_what_it_refines_is_one_warning_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("concat_lora: true\nfused_lora: false\n")
    resolve_config(recipe, {"model": "m", "data": "d", "out": "o", "load_in_4bit": False})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "concat_lora": True, "load_in_4bit": False})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "seeded_lora_dropout": True, "fused_lora": False})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "concat_lora": True, "load_in_4bit": True})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "carved_lora_dropout": True})
    resolve_config(None, {"model": "m", "data": "d", "out": "o", "carved_lora_dropout": True, "compile_layers": True})
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {recipe}:1: concat_lora is ignored without fused_lora and load_in_4bit",
        "warning: --concat-lora: concat_lora is ignored without load_in_4bit",
        "warning: --seeded-lora-dropout: seeded_lora_dropout is ignored without fused_lora",
        "warning: --carved-lora-dropout: carved_lora_dropout is ignored without compile_layers"]


def test_a_flag_that_replaces_a_recipe_value_says_so_once(oasst, tmp_path: Path) -> None:
    from tests.train.conftest import GUANACO, STORIES

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {STORIES}\ndata: {GUANACO}\nlora_r: 8\nlearning_rate: 1.0e-3\n"
                      "target_modules: [q_proj, v_proj]\n")
    notes: list[str] = []
    cfg = resolve_config(recipe, {"lora_r": 4, "learning_rate": "0.001", "target_modules": "q_proj,o_proj",
                                  "max_steps": 3, "out": "o"}, notes=notes)
    assert cfg.lora_r == 4
    # The same value given again (as text here) is no change; a flag the recipe does not set replaces nothing.
    assert notes == [f"--lora-r 4 overrides {recipe}:3 (lora_r: 8)",
                     f"--target-modules q_proj,o_proj overrides {recipe}:5 (target_modules: q_proj,v_proj)"]
    result = oasst("train", "--config", recipe, "--lora-r", 4, "--out", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"--lora-r 4 overrides {recipe}:3 (lora_r: 8)"
    assert "overrides" not in result.stdout


def test_the_old_dtype_key_reads_as_compute_dtype_in_train_as_in_eval(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # One rename table (oasst_model.spec.RENAMED_KEYS) for every command's config file; train refused `dtype`.
    (tmp_path / "t.yaml").write_text("model: m\ndata: d\nout: o\ndtype: float32\n")
    cfg = resolve_config(tmp_path / "t.yaml", {})
    assert cfg.compute_dtype == "float32"
    assert capsys.readouterr().err == (f"warning: {tmp_path / 't.yaml'}:4: `dtype` is now `compute_dtype`; rename it "
                                       "(the old name is read until the next release)\n")
    (tmp_path / "t.yaml").write_text("model: m\ndata: d\nout: o\ndtype: float32\ncompute_dtype: bfloat16\n")
    with pytest.raises(OasstError, match=r"t.yaml:4: `dtype` is the old name of `compute_dtype`, which is set too"):
        resolve_config(tmp_path / "t.yaml", {})
