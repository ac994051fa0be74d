"""The layout holds: the eval plug-in loads models through the shared model layer, never through the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "eval" / "oasst_eval"


def test_no_module_under_eval_imports_the_trainer_package() -> None:
    offenders = []
    for path in sorted(EVAL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] == "oasst_train"]
    assert offenders == []


def test_running_eval_code_loads_no_trainer_module() -> None:
    code = ("import sys, oasst_eval.cli, oasst_eval.run, oasst_eval.lora4bit, oasst_eval.data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'oasst_train'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
