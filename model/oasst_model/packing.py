"""Packed rows: where each example starts, the varlen kernel's boundaries, the block-diagonal causal mask.

One rule for all of them: an example starts at a row's first token and at every token whose position id does not
continue the one before (a restart at 0, as trl's padding-free collator makes them, or at any other id).

    starts = example_starts(position_ids)                  # bool like position_ids
    boundaries, longest = packed_boundaries(position_ids)  # [N + 1] int32 and the longest example, on the host
    mask = block_causal_mask(position_ids)                 # [B, 1, L, L] bool for sdpa
"""

from __future__ import annotations

from typing import Any


def example_starts(position_ids: Any) -> Any:
    """Bool like `position_ids`: True where a packed example starts (a row's first token, and every token whose
    position id does not continue the one before: a restart at 0, or at any other id)."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def packed_boundaries(position_ids: Any) -> tuple[Any, int]:
    """(boundaries [N + 1] int32, longest example) of the packed examples in `position_ids` (host tensors): the
    varlen kernel's cumulative sequence lengths, every row one run of tokens, by `example_starts`' rule."""
    return boundaries_from_starts(example_starts(position_ids))


def boundaries_from_starts(starts: Any) -> tuple[Any, int]:
    """(boundaries [N + 1] int32, longest example) from `example_starts` (on the host: the longest is read)."""
    import torch

    edges = torch.nonzero(starts.reshape(-1)).reshape(-1)
    boundaries = torch.cat([edges, torch.tensor([starts.numel()], device=starts.device)]).to(torch.int32)
    return boundaries, int((boundaries[1:] - boundaries[:-1]).max())


def block_causal_mask(position_ids: Any, attention_mask: Any = None) -> Any:
    """[B, 1, L, L] bool: token i sees token j iff j <= i and both lie in the same packed example.

    Examples start where `example_starts` says (a position id that does not continue the one before). Keys that
    `attention_mask` marks as padding are hidden too, except from themselves, so no row is empty (an empty row
    makes sdpa return NaN).
    """
    import torch

    example = torch.cumsum(example_starts(position_ids).to(torch.int32), dim=-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril_()
    mask = (example[:, :, None] == example[:, None, :]) & causal
    if attention_mask is not None:
        mask &= attention_mask.bool()[:, None, :]
        mask |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    return mask[:, None]
