"""Shared fixtures for the `oasst train` tests: offline, one CPU thread, tiny real and scaled-down models."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FALCON_TOKENIZER, STORIES  # noqa: F401 - re-exported for test modules

# One thread: on a shared 2-core machine, two OpenMP threads wait on each other and every op costs ~10 ms.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"})

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "models"
GUANACO = REPO / "fixtures" / "guanaco-en"
RECIPES = REPO / "train" / "recipes"
# The stories260K run most tests share: tiny-cpu recipe (4-bit), fewer steps.
STORIES_STEPS = 60


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path with one torch thread and only this project's plug-ins registered."""
    import torch

    import oasst_tools.cli as core_cli

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core_cli, "DISCOVER_ENTRY_POINTS", False)
    monkeypatch.setattr(core_cli, "EXTRA_COMMANDS", {
        name: f"oasst_train.cli:{name}" for name in ("train", "merge", "generate", "chat")})


@pytest.fixture
def oasst() -> Callable[..., Any]:
    """Run `oasst ARGS...` in-process through the real CLI group; returns click's Result."""
    return invoke


def invoke(*args: object, input: str | None = None) -> Any:  # noqa: A002 - CliRunner's name
    """`oasst ARGS...` in-process (usable from session fixtures, which cannot take `oasst`)."""
    from click.testing import CliRunner

    import oasst_tools.cli as core_cli

    old = core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS
    core_cli.EXTRA_COMMANDS = {name: f"oasst_train.cli:{name}" for name in ("train", "merge", "generate", "chat")}
    core_cli.DISCOVER_ENTRY_POINTS = False
    try:
        return CliRunner().invoke(core_cli.cli, [str(a) for a in args], input=input, catch_exceptions=False)
    finally:
        core_cli.EXTRA_COMMANDS, core_cli.DISCOVER_ENTRY_POINTS = old


def error_line(result: Any) -> str:
    """The single `error: ...` line a failed command printed (and check it printed nothing else to stderr)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert lines and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[-1]


def read_summary(out: Path) -> dict[str, Any]:
    """train_summary.json of a finished run."""
    return json.loads((out / "train_summary.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def stories_run(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-bit LoRA run of the tiny-cpu recipe on the Guanaco fixture (shared: it takes ~30 s)."""
    out = tmp_path_factory.mktemp("stories-run") / "run"
    result = invoke("train", "--config", RECIPES / "tiny-cpu.yaml", "--model", stories, "--data", GUANACO,
                    "--out", out, "--max-steps", STORIES_STEPS, "--save-steps", 30, "-q")
    assert result.exit_code == 0, result.output
    return out


# stories260K as a GGUF file, built at test time: the `.gguf` path of load_model / `oasst train` needs a real file, and
# downloading one is not an option offline. HF name -> llama.cpp name, as convert_hf_to_gguf.py maps them for llama.
GGUF_LLAMA_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GGUF_LLAMA_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


@pytest.fixture(scope="session")
def stories_gguf(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K written as an F32 GGUF file the way llama.cpp's convert_hf_to_gguf.py writes a Llama (~0.1 s)."""
    import re

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((stories / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((stories / "tokenizer_config.json").read_text(encoding="utf-8"))
    pieces = sentencepiece_pieces(stories / "tokenizer.model")
    vocab = json.loads((stories / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    # The hand-written protobuf reader must agree with the fast tokenizer's vocabulary, id for id.
    assert [piece for piece, _, _ in pieces] == sorted(vocab, key=vocab.__getitem__), "tokenizer.model misread"
    assert len(pieces) == config["vocab_size"]

    out = tmp_path_factory.mktemp("stories-gguf") / "stories260K-F32.gguf"
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name("stories260K")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    # llama.cpp's sentencepiece vocabulary: tokenizer model "llama", every piece with its score, and its type, whose
    # sentencepiece enum values (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6) are gguf.TokenType's.
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([piece for piece, _, _ in pieces])
    writer.add_token_scores([score for _, score, _ in pieces])
    writer.add_token_types([kind for _, _, kind in pieces])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(next(i for i, (_, _, kind) in enumerate(pieces) if kind == gguf.TokenType.UNKNOWN))
    writer.add_add_bos_token(tokenizer_config["add_bos_token"])
    writer.add_add_eos_token(tokenizer_config["add_eos_token"])

    n_head, n_kv_head = config["num_attention_heads"], config["num_key_value_heads"]
    for name, weight in load_file(stories / "model.safetensors").items():
        module, suffix = name.rsplit(".", 1)
        block = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
        # A KeyError here is a tensor this table does not know: fail rather than write a model missing it.
        gguf_name = (f"blk.{block[1]}.{GGUF_LLAMA_BLOCK_NAMES[block[2]]}" if block
                     else GGUF_LLAMA_TOP_NAMES[module])
        if gguf_name.endswith(".attn_q"):
            weight = llama_cpp_permute(weight, n_head)
        elif gguf_name.endswith(".attn_k"):
            weight = llama_cpp_permute(weight, n_kv_head)
        writer.add_tensor(f"{gguf_name}.{suffix}", weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_cpp_permute(weight: Any, n_head: int) -> Any:
    """llama.cpp's `LlamaModel.permute` of a q or k projection (rows = heads x head_dim).

    Hugging Face's rotary embedding pairs dimension i with i + head_dim/2 of each head; ggml's pairs neighbours
    (2i, 2i + 1), so llama.cpp interleaves the two halves of every head, and transformers' GGUF loader
    (LlamaTensorProcessor._reverse_permute_weights) undoes exactly this. Keys use the number of key-value heads.
    """
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def sentencepiece_pieces(model_file: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every token of a sentencepiece `tokenizer.model`, in id order.

    Read from the protobuf wire format (ModelProto field 1: the pieces; a piece's field 1: text, 2: score, 3: type,
    NORMAL = 1 when absent) because neither sentencepiece nor protobuf is a dependency of this project.
    """
    import struct

    pieces = []
    for number, value in protobuf_fields(model_file.read_bytes()):
        if number == 1:
            fields = dict(protobuf_fields(value))
            score = struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0
            pieces.append((fields[1].decode("utf-8"), score, fields.get(3, 1)))
    return pieces


def protobuf_fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) of each field of one protobuf message: varints as ints, all else as raw bytes."""

    def varint(pos: int) -> tuple[int, int]:
        """The varint starting at `pos`, and the position after it."""
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    fields: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = varint(pos)
        wire_type = key & 7
        if wire_type == 0:
            value, pos = varint(pos)
        elif wire_type in (1, 2, 5):  # fixed64, length-delimited, fixed32
            if wire_type == 2:
                size, pos = varint(pos)
            else:
                size = 8 if wire_type == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire_type} (a group) does not occur in a sentencepiece model")
        fields.append((key >> 3, value))
    return fields


def kill_at_first_checkpoint(out: Path, args: list[Any] | tuple[Any, ...]) -> int:
    """Run `oasst ARGS` (which trains into `out`) in its own process and kill -9 it as soon as it has written a
    complete checkpoint; returns that checkpoint's step. The run must not have finished."""
    import signal
    import subprocess
    import sys
    import time

    from oasst_train.checkpoints import last_complete_checkpoint

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "oasst_tools", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while last_complete_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "train_summary.json").exists()
    return int(last_complete_checkpoint(out).name.split("-")[1])
