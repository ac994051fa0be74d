"""What a field review of `oasst train` / `oasst eval` found (2026-12-06), each through the CLI or the public
functions: a fresh run into a folder of the user's, `~` in a recipe, a --resume of a finished run, paths recorded
absolute, parquet builds, repeated YAML keys, values that used to end in a traceback, one name per summary field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.hostile import assert_unchanged, snapshot
from tests.train.conftest import GUANACO, RECIPES, STORIES_STEPS, error_line, read_summary


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_fresh_run_refuses_a_folder_that_holds_other_files(oasst: Any, stories: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    config = out / "train_config.yaml"
    shutil.copy(RECIPES / "tiny-cpu.yaml", config)
    before = snapshot(tmp_path)
    result = oasst("train", "--config", config, "--model", stories, "--data", GUANACO, "--out", out)
    assert error_line(result) == f"error: --out {out} contains the input --config {config}; choose another --out"
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO, "--out", out)
    assert error_line(result) == (f"error: --out {out} is not empty (it holds README.md); a run writes its adapter, "
                                  "config and card there: choose a new or empty folder")
    assert_unchanged(before, tmp_path)


def test_a_leading_tilde_in_a_recipe_is_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_eval.config import resolve_config as eval_config
    from oasst_train.config import resolve_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recipe = _recipe(tmp_path, "model: ~/models/m\ndata: ~/data\nout: ~/runs/one\ninit_adapter:\n")
    cfg = resolve_config(recipe, {})
    home = tmp_path / "home"
    assert (cfg.model, cfg.data, cfg.out) == (str(home / "models/m"), str(home / "data"), str(home / "runs/one"))
    assert cfg.init_adapter == ""  # an empty value is the default, not None
    (tmp_path / "eval.yaml").write_text("model: ~/models/m\nadapter: ~/runs/one\nout: ~/eval\nshared_context: 'no'\n")
    ecfg = eval_config(tmp_path / "eval.yaml", {})
    assert (ecfg.model, ecfg.adapter, ecfg.out) == (str(home / "models/m"), str(home / "runs/one"), str(home / "eval"))
    assert ecfg.shared_context is False  # the same boolean words as train's config


@pytest.mark.parametrize(("text", "message"), [
    ("seed: -1\n", "seed must be between 0 and 4294967295, not -1"),
    ("seed: 4294967296\n", "seed must be between 0 and 4294967295, not 4294967296"),
    ("batch_size: 100000000000000000000\n", "batch_size must be at most 2,147,483,647, not 100000000000000000000"),
    ("lora_r: 8\nlearning_rate: 1e-4\nlora_r: 16\n", "lora_r is set twice (first at line 1); keep one"),
])
def test_values_that_ended_in_a_traceback_are_one_line(oasst: Any, stories: Path, tmp_path: Path, text: str,
                                                        message: str) -> None:
    recipe = _recipe(tmp_path, text)
    result = oasst("train", "--config", recipe, "--model", stories, "--data", GUANACO, "--out", tmp_path / "o")
    line = error_line(result)
    assert line.startswith(f"error: {recipe}:") and line.endswith(message), line
    assert not (tmp_path / "o").exists()


def test_flash_attention_without_its_package_is_one_line(oasst: Any, stories: Path, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--attn-implementation", "flash_attention_2", "--out", tmp_path / "o")
    assert error_line(result) == ("error: attn_implementation flash_attention_2 needs the flash-attn package (pip "
                                  "install flash-attn, CUDA GPUs only); use sdpa")


def test_eval_refuses_a_key_set_twice(tmp_path: Path) -> None:
    from oasst_eval.config import resolve_config
    from oasst_tools.errors import OasstError

    (tmp_path / "eval.yaml").write_text("model: a\ntasks: hellaswag\nmodel: b\n")
    with pytest.raises(OasstError, match=r"eval.yaml:3: model is set twice \(first at line 1\); keep one"):
        resolve_config(tmp_path / "eval.yaml", {})


def test_a_parquet_build_trains_and_scores_as_its_jsonl_twin(tmp_path: Path) -> None:
    from oasst_eval.data import guanaco_file
    from oasst_tools.files import split_rows
    from oasst_train.data import read_rows

    polars = pytest.importorskip("polars")
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split in ("train", "test"):
        polars.read_ndjson(GUANACO / f"{split}.jsonl").write_parquet(parquet / f"{split}.parquet")
    def rows(folder: Path) -> dict[str, list[tuple[object, object, str]]]:
        return {split: [(e.text, e.messages, e.where.rsplit(":", 1)[1]) for e in examples]
                for split, examples in read_rows(str(folder)).items()}

    assert rows(parquet) == rows(GUANACO)  # the same rows, numbered the same
    assert guanaco_file(parquet) == parquet / "test.parquet"
    assert [row for _, row in split_rows(parquet / "test.parquet")] == \
        [row for _, row in split_rows(GUANACO / "test.jsonl")]


def _copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_resuming_a_finished_run_trains_nothing(oasst: Any, stories_run: Path, stories: Path,
                                                tmp_path: Path) -> None:
    out = _copy_run(stories_run, tmp_path)
    before = snapshot(tmp_path)
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--max-steps", STORIES_STEPS, "--save-steps", 30, "-q", "--resume")
    assert result.exit_code == 0, result.output
    assert (f"--resume: {out} is finished (step {STORIES_STEPS} of {STORIES_STEPS}); nothing to train"
            in result.stderr)
    assert_unchanged(before, tmp_path)


def test_resuming_a_finished_run_shows_an_older_or_edited_summary(oasst: Any, stories_run: Path, stories: Path,
                                                                   tmp_path: Path) -> None:
    """The results table of a finished run is read back from its train_summary.json: one written before
    `eval_loss_last` was named so (`eval_loss`), with a count edited to a float and a field removed, still shows."""
    out = _copy_run(stories_run, tmp_path)
    summary = read_summary(out)
    summary["eval_loss"] = summary.pop("eval_loss_last")
    summary["global_step"] = 2.5
    del summary["peak_memory_bytes"]
    (out / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                   "--out", out, "--max-steps", STORIES_STEPS, "--save-steps", 30, "--resume")
    assert result.exit_code == 0, result.output
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines()
             if line.count("│") == 3}
    assert table["eval loss first -> last"] == f"{summary['eval_loss_first']:.4f} -> {summary['eval_loss']:.4f}"
    assert (table["steps"], table["peak memory"]) == ("-", "-")


def test_a_run_stopped_while_saving_its_outputs_resumes_to_them_without_a_step(
        oasst: Any, stories_run: Path, stories: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    out = _copy_run(stories_run, tmp_path)
    kept = {"checkpoints", "train_config.yaml"}
    for path in out.iterdir():  # killed after the last checkpoint, before the outputs were renamed in
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    last = out / "checkpoints" / f"checkpoint-{STORIES_STEPS}"
    assert last.is_dir()
    # Given relative to the folder it runs in: recorded absolute, so eval finds it from anywhere.
    monkeypatch.chdir(stories.parent)
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories.name, "--data", GUANACO,
                   "--out", out, "--max-steps", STORIES_STEPS, "--save-steps", 30, "-q", "--resume")
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["global_step"] == STORIES_STEPS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (stories_run / "checkpoints").iterdir())  # no checkpoint-61
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(last / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    # One name per concept: the LoRA targets as the setting names them; the timing's skipped steps apart from the
    # learning-rate warm-up setting.
    assert "target_modules" in summary and "lora_target_modules" not in summary
    assert "steady_skipped_steps" in summary and "warmup_steps" not in summary
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(stories)
    assert f"model: {stories}\n" in (out / "train_config.yaml").read_text()
    assert os.path.isabs(adapter_config["base_model_name_or_path"])


def test_guanaco_loss_spans_follow_the_turns_not_markers_quoted_inside_them(stories: Path) -> None:
    from transformers import AutoTokenizer

    from oasst_tools.conversation import encode, guanaco_spans, guanaco_turn_spans
    from oasst_train.data import read_rows

    # The two definitions of a reply's span agree wherever no turn quotes a marker: every fixture row.
    for example in read_rows(str(GUANACO))["train"]:
        text, spans, ends = guanaco_turn_spans(example.messages)
        assert text == example.text and (spans, ends) == guanaco_spans(example.text), example.where
        assert example.conversation("guanaco") is example.messages
    tokenizer = AutoTokenizer.from_pretrained(str(stories))
    quoted = [{"role": "user", "content": "Finish this: ### Assistant: I will not"},
              {"role": "assistant", "content": "Done."}]
    enc = encode(tokenizer, quoted, "guanaco")
    trained = tokenizer.decode([i for i, m in zip(enc.ids, enc.mask) if m])
    assert "I will not" not in trained and "Done." in trained
    # From the text alone the quote cannot be told from a turn: the text's own rule trains it (why rows keep messages).
    text_only = encode(tokenizer, "### Human: Finish this: ### Assistant: I will not### Assistant: Done.", "guanaco")
    assert "I will not" in tokenizer.decode([i for i, m in zip(text_only.ids, text_only.mask) if m])


def test_resume_refuses_other_training_rows(oasst: Any, stories_run: Path, stories: Path, tmp_path: Path) -> None:
    out = _copy_run(stories_run, tmp_path)
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{STORIES_STEPS}")  # stopped after its first checkpoint
    data = tmp_path / "data"
    data.mkdir()
    lines = (GUANACO / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(lines[:40]))
    shutil.copy(GUANACO / "test.jsonl", data / "test.jsonl")
    previous = STORIES_STEPS // 2  # the run's first checkpoint; one step past it shows the resumed run trains
    args = ("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--out", out, "--max-steps",
            previous + 1, "--save-steps", 30, "-q", "--resume")
    before = snapshot(tmp_path)
    assert error_line(oasst(*args, "--data", data)) == (
        f"error: --resume: the data differs from the run in {out} ({len(lines)} -> 40 train rows); resume with the "
        "data it started with, or start a new run in another --out")
    assert_unchanged(before, tmp_path)
    # As many rows, one of them edited: the count alone would let it through.
    assert "ChatGPT" in lines[0]  # in its text and its messages alike
    (data / "train.jsonl").write_text("".join([lines[0].replace("ChatGPT", "ChatGTP")] + lines[1:]))
    before = snapshot(tmp_path)
    assert error_line(oasst(*args, "--data", data)) == (
        f"error: --resume: the data differs from the run in {out} (the same number of rows, other contents); resume "
        "with the data it started with, or start a new run in another --out")
    assert_unchanged(before, tmp_path)
    # The same rows read from another place (a copy of the folder) resume.
    (data / "train.jsonl").write_text("".join(lines))
    assert json.loads((out / "data_fingerprint.json").read_text())["train_rows"] == len(lines)
    result = oasst(*args, "--data", data)
    assert result.exit_code == 0, result.output
    summary = read_summary(out)
    assert summary["resumed_from"] == f"checkpoint-{previous}" and summary["global_step"] == previous + 1



def test_dpo_says_when_the_init_adapter_replaces_a_lora_setting(stories_run: Path, stories: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from oasst_train import dpo
    from oasst_train.config import resolve_config

    trained = json.loads((stories_run / "adapter_config.json").read_text())
    recipe = RECIPES / "tiny-cpu-dpo.yaml"
    flags = {"model": str(stories), "data": "d", "out": str(tmp_path / "o"), "init_adapter": str(stories_run)}
    cfg, _ = dpo.adopt_init_adapter(resolve_config(recipe, {**flags, "lora_r": trained["r"] + 4}))
    assert cfg.lora_r == trained["r"]
    assert capsys.readouterr().err == (f"warning: lora_r {trained['r'] + 4} is replaced by {trained['r']} of "
                                       f"--init-adapter {stories_run}: DPO trains on the SFT adapter, whose LoRA shape "
                                       "is fixed\n")
    cfg, _ = dpo.adopt_init_adapter(resolve_config(recipe, {**flags, "lora_r": trained["r"]}))
    assert "warning" not in capsys.readouterr().err  # the same value: nothing to say
    # The format came from the adapter, not from the user: the line says so (it said "set").
    from oasst_model.load import load_tokenizer
    from oasst_train.preview import run_format

    assert run_format(cfg, load_tokenizer(str(stories)))[1] == "format: guanaco (as --init-adapter was trained)"


def test_an_empty_test_split_is_said_not_silently_skipped(oasst: Any, stories: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(GUANACO / "train.jsonl", data / "train.jsonl")
    (data / "test.jsonl").write_text("")
    result = oasst("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", data,
                   "--out", tmp_path / "o", "--max-steps", 1, "--eval-steps", 1, "--max-length", 1024,
                   "--optim", "paged_adamw_32bit", "--activation-offloading", "-q")
    assert result.exit_code == 0, result.output
    assert (f"warning: --data {data}: its test split has no rows, so nothing is evaluated (eval_steps 1 is "
            "ignored)") in result.stderr
    assert read_summary(tmp_path / "o")["eval_loss_last"] is None
    # bitsandbytes' warning per parameter becomes one line of ours (its own is filtered: see the next test).
    assert ("warning: optim paged_adamw_32bit: paged optimizers need a CUDA GPU; bitsandbytes runs it unpaged here "
            "(the same updates)") in result.stderr
    # trl's offloading needs an accelerator (it failed at the first step on a CPU).
    assert ("warning: activation_offloading: the model is on the CPU, where activations already are; training "
            "without it") in result.stderr
    # stories260K was trained on 512 positions.
    assert (f"warning: max_length 1024 is beyond the 512 positions {stories} was trained with; rows longer than 512 "
            "tokens go past them") in result.stderr


def test_bitsandbytes_paged_optimizer_warning_is_filtered() -> None:
    import warnings

    from oasst_model.quiet import quiet

    def paged_warning() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit("Paged optimizers are not supported on CPU. Falling back to non-paged optimizer "
                                   "behavior.", UserWarning, "optimizer.py", 509, module="bitsandbytes.optim.optimizer")
        return seen

    assert len(paged_warning()) == 1  # shown without the filter
    with quiet():
        assert paged_warning() == []



def test_rows_whose_turns_do_not_alternate_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from oasst_train.data import read_rows

    rows = [json.loads(line) for line in (GUANACO / "train.jsonl").read_text().splitlines()]
    rows[2]["messages"] = [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}]
    rows[5]["messages"] = [*rows[5]["messages"][:1], {"role": "assistant", "content": "  "}]
    del rows[2]["text"], rows[5]["text"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_rows(str(data))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: 1 row(s) whose messages do not alternate user and assistant (first: {data / 'train.jsonl'}:3)",
        f"warning: 1 row(s) whose messages have a turn with empty content (first: {data / 'train.jsonl'}:6)"]
    read_rows(str(GUANACO))  # an `oasst build` folder: nothing to say
    assert capsys.readouterr().err == ""


def test_a_finished_checkpoint_is_judged_by_the_steps_or_epochs_asked_for_now(tmp_path: Path) -> None:
    from oasst_train.checkpoints import finished_at

    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 10,
                                                              "num_train_epochs": 1}))
    assert finished_at(checkpoint, 10, 1.0) == 10
    assert finished_at(checkpoint, -1, 1.0) == 10  # by epochs: the steps they came to
    assert finished_at(checkpoint, 20, 1.0) is None  # more steps: train on
    assert finished_at(checkpoint, -1, 2.0) is None  # more epochs: train on (transformers counts them)


def test_only_local_folders_and_gguf_files_are_recorded_absolute(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from oasst_train.outputs import absolute

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "gpt2").write_text("a file that happens to share a hub id's name")
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    assert absolute("models/m") == str(tmp_path / "models" / "m")
    assert absolute("tiny.gguf") == str(tmp_path / "tiny.gguf")
    assert absolute("gpt2") == "gpt2"  # transformers loads the hub model here: so must eval
    assert (absolute("owner/name"), absolute("")) == ("owner/name", "")


@pytest.mark.parametrize("record", [b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, b"{cut", b"[]", b"\xff"],
                         ids=["nested-past-the-parser", "not-json", "not-an-object", "not-utf8"])
def test_an_unreadable_data_fingerprint_is_not_compared_and_a_differing_one_refuses(tmp_path: Path,
                                                                                   record: bytes) -> None:
    """--resume compares the run's data_fingerprint.json with the data: one nested past json's recursion limit
    (once a RecursionError 'bug' line) or damaged otherwise cannot be compared, as a run from before the record."""
    from oasst_tools.errors import OasstError
    from oasst_train.outputs import check_same_data

    fingerprint = {"train_rows": 3, "sha256": "ab"}
    (tmp_path / "data_fingerprint.json").write_bytes(record)
    check_same_data(tmp_path, fingerprint)
    (tmp_path / "data_fingerprint.json").write_text(json.dumps({"train_rows": 4, "sha256": "ab"}))
    with pytest.raises(OasstError, match=r"4 -> 3 train rows"):
        check_same_data(tmp_path, fingerprint)


def test_an_adapter_config_naming_modules_to_save_it_lacks_is_one_line(oasst: Any, stories_run: Path,
                                                                        tmp_path: Path) -> None:
    """peft raises a bare KeyError ('base_model.model.lm_head.weight') for a modules_to_save whose weights the
    file lacks: the line says which adapter, which base, what is missing and which setting names it."""
    out = _copy_run(stories_run, tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"modules_to_save": ["lm_head"]}))
    before = snapshot(tmp_path)
    line = error_line(oasst("generate", out, "--prompt", "hi", "--max-new-tokens", "2"))
    assert line.startswith(f"error: adapter {out} does not fit ") and line.endswith(
        "peft found no 'base_model.model.lm_head.weight' in the adapter's weights or the model (adapter_config.json's "
        "modules_to_save or target_modules name it)"), line
    assert_unchanged(before, tmp_path)


def test_a_runs_own_train_config_reruns_as_its_header_says(oasst: Any, stories_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The command in train_config.yaml's first line (and the card) runs as written, with no warnings about settings
    the file records at their defaults (beta and loss_type of an SFT run), and resolves to the same config."""
    import yaml

    from oasst_train.card import RERUN

    header = (stories_run / "train_config.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert header.endswith(f"rerun with: {RERUN}") and RERUN in (stories_run / "README.md").read_text()
    monkeypatch.chdir(stories_run)
    argv = [tmp_path / "again" if word == "NEW_OUT" else word for word in RERUN.split()[2:]]
    result = oasst("train", *argv, "--max-steps", 2, "-q")  # 2 steps: the config is the point, not the training
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "", result.stderr  # -q keeps warnings: none here
    first, again = (yaml.safe_load((run / "train_config.yaml").read_text(encoding="utf-8"))
                    for run in (stories_run, tmp_path / "again"))
    assert again.pop("out") == str(tmp_path / "again") and first.pop("out") == str(stories_run)
    assert (again.pop("max_steps"), first.pop("max_steps")) == (2, STORIES_STEPS)
    assert again == first
