"""Bad input to `oasst eval`: one `error:` line on stderr, exit 1, no traceback, before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


def _only_error_line(result: object, *, alone: bool = True) -> str:
    """The `error:` line; `alone` when the check runs before anything else prints (no model loaded)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    if alone:
        assert len(lines) == 1, result.stderr
    return lines[-1]


def test_unknown_task_names_the_close_matches(oasst, stories: Path) -> None:
    line = _only_error_line(oasst("eval", "--model", stories, "--tasks", "hellaswg"))
    assert line == ("error: unknown task 'hellaswg' (close: hellaswag, hellaswag_vi, hellaswag_uk, hellaswag_te, "
                    "hellaswag_ta); `lm_eval ls tasks` lists all")


def test_missing_model_folder_fails_before_anything_loads(oasst) -> None:
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "hellaswag"))
    assert line == "error: model folder m does not exist (a hub model id has the form owner/name)"


def test_an_empty_out_is_refused_not_read_as_the_current_folder(oasst, tmp_path: Path) -> None:
    assert _only_error_line(oasst("eval", "--model", "m", "--out", " ")) == "error: --out: out is empty: give a folder"
    (tmp_path / "e.yaml").write_text('model: m\nout: ""\n')
    line = _only_error_line(oasst("eval", "--config", tmp_path / "e.yaml"))
    assert line == f"error: {tmp_path / 'e.yaml'}:2: out is empty: give a folder"


def test_missing_adapter_folder(oasst) -> None:
    line = _only_error_line(oasst("eval", "--model", "m", "--adapter", "no-such-adapter"))
    assert line == "error: adapter folder no-such-adapter does not exist"


def test_folder_without_adapter_config_is_not_an_adapter(oasst, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _only_error_line(oasst("eval", "--model", "m", "--adapter", "empty"))
    assert line == "error: empty is not a LoRA adapter: it has no adapter_config.json"


@pytest.mark.slow
def test_adapter_for_another_base_model(oasst, stories: Path, adapter_dir: Path, other_base: Path) -> None:
    # The mismatch shows only when the adapter meets the loaded model, after the settings line.
    line = _only_error_line(oasst("eval", "--model", other_base, "--adapter", adapter_dir, "--limit", "2"), alone=False)
    prefix = f"error: adapter {adapter_dir} was trained on {stories}, not on {other_base}: "
    assert line.startswith(prefix), line
    # Which layer is named first depends on the adapter's file order; each fits only stories260K's widths.
    assert re.fullmatch(r"layer model\.layers\.0\.\S+ takes (32 inputs, the adapter expects 64|86 inputs, the adapter "
                        r"expects 172)", line[len(prefix):]), line


def test_data_dir_without_the_task_files(oasst, tmp_path: Path) -> None:
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    (tmp_path / "data" / "hellaswag" / "train.jsonl").write_text("{}\n")
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "hellaswag", "--data-dir", "data"))
    assert line == ("error: data (from --data-dir) has no hellaswag/validation.jsonl or hellaswag/validation.jsonl.gz; "
                    "a data dir holds one folder per task with the original dataset's split files")


def test_data_dir_from_the_environment_is_named_as_such(oasst, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("OASST_EVAL_DATA", "elsewhere")
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "hellaswag"))
    assert line.startswith("error: elsewhere (from OASST_EVAL_DATA) has no hellaswag/validation.jsonl ")


def test_guanaco_test_without_build_output(oasst) -> None:
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "guanaco_test"))
    assert line == "error: task guanaco_test needs --data DIR: the output folder of `oasst build` (with test.jsonl)"


def test_guanaco_test_with_a_folder_lacking_test_jsonl(oasst, tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "guanaco_test", "--data", "build"))
    assert line == "error: build/test.jsonl not found: --data must be an `oasst build` output folder with test.jsonl"


def test_hub_only_task_offline(oasst, stories: Path) -> None:
    line = _only_error_line(oasst("eval", "--model", stories, "--tasks", "arc_easy"))
    assert line == ("error: task arc_easy needs the Hub dataset allenai/ai2_arc, which is not cached and cannot be "
                    "downloaded offline (Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)); "
                    "tasks with local data: guanaco_pairs, guanaco_test, hellaswag")


def test_compare_base_needs_an_adapter(oasst) -> None:
    line = _only_error_line(oasst("eval", "--model", "m", "--compare-base"))
    assert line == "error: --compare-base needs --adapter: it compares the base model with base + adapter"


def test_few_shot_is_refused_for_the_guanaco_perplexity(oasst) -> None:
    guanaco = Path(__file__).resolve().parents[2] / "fixtures" / "guanaco-en"
    line = _only_error_line(oasst("eval", "--model", "m", "--tasks", "guanaco_test", "--data", guanaco,
                                  "--num-fewshot", "3"))
    assert line == ("error: --num-fewshot 3: guanaco_test is a perplexity over whole test conversations and takes "
                    "no few-shot examples; leave --num-fewshot out")


def test_few_shot_hellaswag_needs_a_train_split(oasst, tmp_path: Path) -> None:
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    (tmp_path / "data" / "hellaswag" / "validation.jsonl").write_text("{}\n")
    line = _only_error_line(oasst("eval", "--model", "m", "--num-fewshot", "5", "--data-dir", "data"))
    assert line == ("error: --num-fewshot 5 needs data/hellaswag/train.jsonl[.gz]: "
                    "lm-eval draws hellaswag's examples from the train split")


def test_config_file_with_unknown_keys_lists_them_all(oasst, tmp_path: Path) -> None:
    (tmp_path / "eval.yaml").write_text("model: m\nbatchsize: 8\nlimt: 3\n")
    line = _only_error_line(oasst("eval", "--config", "eval.yaml"))
    assert line == ("error: eval.yaml: unknown config keys: batchsize (batch_size?), limt (limit?) (see `oasst eval "
                    "--help` for the known ones)")


def test_missing_model_flag(oasst) -> None:
    line = _only_error_line(oasst("eval", "--tasks", "hellaswag"))
    assert line == ("error: --model is required (a model folder, a Hub name or a .gguf file), or --adapter DIR of an "
                    "`oasst train` run, whose base it names")


def test_a_flag_that_replaces_a_config_value_says_so_before_anything_loads(oasst, tmp_path: Path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text("model: m\ntasks: hellaswag\nlimit: 5\nnum_fewshot: 0\n")
    result = oasst("eval", "--config", config, "--limit", "4", "--num-fewshot", "0", "--tasks", "hellaswag")
    lines = result.stderr.splitlines()
    assert lines[0] == f"--limit 4 overrides {config}:3 (limit: 5)"
    assert _only_error_line(result, alone=False) == ("error: model folder m does not exist (a hub model id has the "
                                                     "form owner/name)")
    assert len(lines) == 2
