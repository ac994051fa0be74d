"""Test helper: what torch's cuDNN-attention switch said at every sdpa call (the `cudnn_attention` setting)."""

from __future__ import annotations

from typing import Any


def record_cudnn_switch(monkeypatch: Any) -> list[bool]:
    """A list that gets `torch.backends.cuda.cudnn_sdp_enabled()` at each `scaled_dot_product_attention` call
    (transformers looks the function up at call time, so the wrapper sees every call)."""
    import torch

    seen: list[bool] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return seen
