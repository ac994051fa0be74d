"""Data-parallel training on the CPU: 2 processes through torch's own launcher (gloo), as on 2 GPUs with accelerate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import GUANACO, RECIPES, REPO, STORIES


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(out: Path, steps: int, processes: int) -> dict:
    args = ["train", "--config", str(RECIPES / "tiny-cpu.yaml"), "--model", str(STORIES), "--data", str(GUANACO),
            "--out", str(out), "--no-load-in-4bit", "--max-steps", str(steps), "--save-steps", "1000", "--eval-rows", "8"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*launcher, "-m", "oasst_tools", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "train_summary.json").read_text())


@pytest.mark.slow
def test_two_ranks_split_the_data_and_count_tokens_once(tmp_path: Path):
    two = train(tmp_path / "two", steps=4, processes=2)
    one = train(tmp_path / "one", steps=8, processes=1)
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Each rank takes its own share of the same shuffled order: 2 ranks x 4 steps read exactly the examples
    # 1 rank reads in 8 steps. Had both ranks read the same batches, the summed token count would differ.
    assert two["tokens_seen"] == one["tokens_seen"]
    assert two["real_tokens_per_second"] > 0
    # Both replicas end with the same adapter (DDP averaged every gradient); a digest of nothing would match too,
    # so it must also differ from the single-process run, which took other steps.
    assert len(two["replica_checksums"]) == 2 and len(set(two["replica_checksums"])) == 1
    assert one["replica_checksums"] != two["replica_checksums"][:1]
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()
