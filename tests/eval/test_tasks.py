"""The shipped lm-eval tasks: lm-eval's own hellaswag config on local files, data-dir resolution, light imports."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from oasst_eval import data


def test_shipped_hellaswag_is_lm_evals_own_config_but_the_data_source(lm_eval_tasks_dir: Path) -> None:
    import lm_eval.tasks.hellaswag.utils as upstream
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = load_yaml(Path(upstream.__file__).with_name("hellaswag.yaml"))
    ours = load_yaml(lm_eval_tasks_dir / "hellaswag" / "hellaswag.yaml")
    data_keys = {"dataset_path", "dataset_name", "custom_dataset"}
    differing = {k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k)}
    assert differing <= data_keys | {"process_docs"}, differing
    # lm-eval re-executes its task modules when it loads their YAML, so compare the function, not the object.
    fn = theirs["process_docs"]
    assert (fn.__module__, fn.__qualname__) == ("lm_eval.tasks.hellaswag.utils", "process_docs")
    assert fn.__code__.co_code == upstream.process_docs.__code__.co_code
    # Ours runs that same function once per dataset (test_fastlm checks the documents are identical).
    assert (ours["process_docs"].__module__, ours["process_docs"].__qualname__) == ("oasst_eval.data",
                                                                                    "hellaswag_process_docs")


def test_fixture_is_the_first_100_rows_of_the_full_validation_set() -> None:
    fixture = Path(data.FIXTURE_DIR) / "hellaswag" / "validation.jsonl"
    full = data.FIXTURE_DIR.parents[1] / "shared" / "data" / "hellaswag" / "validation.jsonl.gz"
    rows = fixture.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 100
    assert set(json.loads(rows[0])) == {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label",
                                        "source_id", "split", "split_type"}
    if full.is_file():
        with gzip.open(full, "rt", encoding="utf-8") as fh:
            assert [next(fh).rstrip("\n") for _ in range(100)] == rows


def test_data_dir_flag_beats_environment_beats_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.resolve_data_dir(None) == (data.FIXTURE_DIR, "fixture subset")
    monkeypatch.setenv("OASST_EVAL_DATA", str(tmp_path / "env"))
    assert data.resolve_data_dir(None) == (tmp_path / "env", "OASST_EVAL_DATA")
    assert data.resolve_data_dir(tmp_path / "flag") == (tmp_path / "flag", "--data-dir")


def test_gzipped_split_is_read_like_the_plain_one(tmp_path: Path) -> None:
    plain = (data.FIXTURE_DIR / "hellaswag" / "validation.jsonl").read_bytes()
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl.gz").write_bytes(gzip.compress(plain))
    ds = data.hellaswag_dataset(data_dir=str(tmp_path), version=1.0)  # lm-eval also passes task metadata
    assert ds["validation"].num_rows == 100
    assert ds["validation"][0]["endings"][3] == "starts pulling up roofing on a roof."
    assert ds["train"].num_rows == 0


def test_broken_json_line_names_file_and_line(tmp_path: Path) -> None:
    from oasst_tools.errors import OasstError

    (tmp_path / "hellaswag").mkdir()
    first = (data.FIXTURE_DIR / "hellaswag" / "validation.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(first + '\n{"ind": \n')
    with pytest.raises(OasstError, match=r"validation\.jsonl:2: not valid JSON \(Expecting value\)$"):
        data.hellaswag_dataset(data_dir=str(tmp_path))


def test_lm_eval_builds_our_hellaswag_with_its_preprocessing(tmp_path: Path) -> None:
    from oasst_eval.taskset import load_tasks, task_manager

    manager = task_manager(["hellaswag"], {"data_dir": str(data.FIXTURE_DIR)})
    (task,) = load_tasks(manager, ["hellaswag"])
    doc = task.validation_docs()[0]
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["gold"] == 3 and len(doc["choices"]) == 4
    assert task.config.output_type == "multiple_choice"


def test_guanaco_test_counts_tokens_with_the_models_tokenizer(stories: Path, guanaco_dir: Path) -> None:
    from transformers import AutoTokenizer

    ds = data.guanaco_test_dataset(data=str(guanaco_dir), pretrained=str(stories))["test"]
    tok = AutoTokenizer.from_pretrained(stories)
    assert ds.num_rows == 17
    assert ds[0]["num_tokens"] == len(tok.encode(ds[0]["text"]))
    results = data.guanaco_process_results(ds[0], [-100.0])
    assert results["token_loss"] == (-100.0, ds[0]["num_tokens"])
    assert data.token_loss([(-10.0, 4), (-20.0, 6)]) == pytest.approx(3.0)


def test_cli_module_imports_nothing_heavy() -> None:
    code = ("import sys, oasst_eval.cli, oasst_eval.config, oasst_eval.data; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'lm_eval', 'datasets', 'polars', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
