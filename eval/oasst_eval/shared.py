"""Shared-context scoring: a multiple-choice item's context runs through the model once, not once per choice.

lm-eval scores a HellaSwag item as four requests (context, ending), each a row `context + ending[:-1]`: the
context is computed four times. Here the requests of one context become one packed row

    context | ending 1[:-1] | ending 2[:-1] | ...        positions 0..C-1 | C.. | C.. | ...

with a block mask under which every context token sees the context causally and every ending token sees the
whole context and its own ending causally, never another ending. Each ending token thus has exactly the keys,
values and positions it has in its own row, so the log-likelihoods are the unshared ones up to floating-point
rounding (the same sums in another order). The first continuation token of every ending is predicted by the
last context position, computed once. On the first 2,000 HellaSwag items with the Falcon tokenizer this halves
the model tokens (333,405 -> 165,891).

Which requests share: those whose context (as tokens) is shared with another request, that lm-eval would not
truncate (context + continuation fits the model's window), and whose whole input is not also the input of a
request with another context (lm-eval's one-token logits cache would group those; they keep lm-eval's path).
Everything else goes through FastHFLM's unshared path unchanged.

The plan, the rows and the mask are built by the functions here; `SharedContextScoring` is the part of
`FastHFLM` (oasst_eval.fastlm) that runs them and checks them against the unshared path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oasst_eval.fastlm import Request, _Batch

# Attention implementations whose forward takes a ready [batch, 1, query, key] mask from the caller as it is:
# sdpa as booleans (True: may attend), eager as an additive float mask.
MASK_KINDS = {"sdpa": "bool", "eager": "float"}
# Requests of the first batch also scored unshared (the first groups: the longest contexts, where a mask that is
# misread only past some length shows first). A misread mask shows in every group with two or more choices, so a
# few groups find it. First 2,000 HellaSwag items, Falcon tokenizer: the whole first batch (336 requests) cost ~19%
# more model tokens, 64 requests 3.1% (4,943 tokens), 16 requests (4 items) 0.8% (1,318).
CHECK_REQUESTS = 16


@dataclass
class Group:
    """The requests of one context, packed into one row: context, then each distinct continuation minus its last
    token."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    members: list[list[int]] = field(default_factory=list)  # request indices that ask for each continuation

    @property
    def length(self) -> int:
        """Tokens of the packed row."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)

    @property
    def requests(self) -> int:
        """Requests this group answers."""
        return sum(len(m) for m in self.members)


def plan(requests: Sequence[tuple[Any, list[int], list[int]]], max_length: int) -> tuple[list[Group], list[int]]:
    """(groups of shared requests, indices of the requests that keep the unshared path).

    A group's row never exceeds `max_length` tokens: a context with more continuations than fit is split over
    several rows, each with the context again.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    contexts_of_input: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    rest: list[int] = []
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(context) + len(continuation) > max_length + 1:
            rest.append(i)  # lm-eval's empty-context and truncation branches: the unshared path
            continue
        key = tuple(context)
        by_context.setdefault(key, []).append(i)
        contexts_of_input.setdefault(key + tuple(continuation[:-1]), set()).add(key)
    groups: list[Group] = []
    for key, indices in by_context.items():
        if len(indices) < 2 or any(len(contexts_of_input[key + tuple(requests[i][2][:-1])]) > 1 for i in indices):
            rest.extend(indices)
            continue
        group = Group(context=list(key))
        seen: dict[tuple[int, ...], int] = {}
        for i in indices:
            continuation = requests[i][2]
            slot = seen.get(tuple(continuation))
            if slot is None:
                if group.continuations and group.length + len(continuation) - 1 > max_length:
                    groups.append(group)
                    group, seen = Group(context=list(key)), {}
                seen[tuple(continuation)] = slot = len(group.continuations)
                group.continuations.append(list(continuation))
                group.members.append([])
            group.members[slot].append(i)
        groups.append(group)
    rest.sort()
    return groups, rest


@dataclass
class Packed:
    """A batch of packed rows, right-padded: what the model gets and where to read each continuation back."""

    input_ids: Any  # [rows, width] long, pad id 0 (lm-eval's)
    position_ids: Any  # [rows, width] long
    segments: Any  # [rows, width] int: 0 context, k >= 1 the k-th continuation, -1 padding
    # Per group and continuation: flat (row * width + position) indices of the logits that predict its tokens.
    gather: list[list[list[int]]]


def pack(groups: Sequence[Group]) -> Packed:
    """The rows of `groups`, one row per group, as CPU tensors."""
    import torch

    width = max(g.length for g in groups)
    input_ids = torch.zeros((len(groups), width), dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.full((len(groups), width), -1, dtype=torch.int32)
    gather: list[list[list[int]]] = []
    for r, group in enumerate(groups):
        tokens, positions, segment = list(group.context), list(range(len(group.context))), [0] * len(group.context)
        last_context = r * width + len(group.context) - 1
        spans = []
        for k, continuation in enumerate(group.continuations, start=1):
            start = len(tokens)
            body = continuation[:-1]
            tokens.extend(body)
            positions.extend(range(len(group.context), len(group.context) + len(body)))
            segment.extend([k] * len(body))
            # The last context token predicts the first continuation token, each next one its predecessor.
            spans.append([last_context] + [r * width + p for p in range(start, start + len(body))])
        n = len(tokens)
        input_ids[r, :n] = torch.tensor(tokens, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(positions, dtype=torch.long)
        segments[r, :n] = torch.tensor(segment, dtype=torch.int32)
        gather.append(spans)
    return Packed(input_ids=input_ids, position_ids=position_ids, segments=segments, gather=gather)


def block_mask(segments: Any, kind: str, dtype: Any = None) -> Any:
    """[rows, 1, width, width] mask: a token sees earlier tokens of the context and of its own segment.

    Padding keys are hidden except from themselves, so no query row is empty (an empty row gives NaN, and a NaN
    value row spreads through later layers even where its weight is zero). `kind` "bool": True where allowed
    (sdpa); "float": 0 where allowed, the dtype's lowest value elsewhere (eager's additive mask).
    """
    import torch

    width = segments.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril_()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def batches(groups: Sequence[Group], budget: int | None, requests_per_batch: int | None,
            max_rows: int | None = None) -> Iterator[list[Group]]:
    """Groups longest first, cut into batches of at most `budget` tokens (rows x padded width) and `max_rows`
    rows, or of about `requests_per_batch` requests (a fixed --batch-size counts requests, as lm-eval does)."""
    ordered = sorted(groups, key=lambda g: (-g.length, g.context))
    i = 0
    while i < len(ordered):
        j = i + 1
        if budget is not None:
            width = ordered[i].length  # the longest row of the batch
            j = i + max(1, min(len(ordered) - i, budget // width, max_rows or budget))
        else:
            answered = ordered[i].requests
            while j < len(ordered) and answered + ordered[j].requests <= (requests_per_batch or 1):
                answered += ordered[j].requests
                j += 1
        yield ordered[i:j]
        i = j


class SharedContextScoring:
    """FastHFLM's shared-context path: score each group of `plan` from one packed row, the first batch checked.

    A mixin of `FastHFLM` (an lm-eval `HFLM`): it reads the model, device, batch settings and dtypes HFLM keeps,
    FastHFLM's `shared_context` / `shared_stats` / `answered`, and runs rows through FastHFLM's `_head_logits`,
    `_finish`, `_score_unshared` and `_batch_tokens`.
    """

    def _mask_kind(self) -> str | None:
        """How the model takes a block mask ("bool" sdpa, "float" eager), or None: no sharing for this model (one
        line in the patch report says why)."""
        from oasst_model import patches

        if not patches.applies("lm_eval_shared_context"):
            return None
        model = self.model
        config = getattr(model, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        kind = MASK_KINDS.get(impl)
        forward = getattr(model, "get_base_model", lambda: model)().forward
        if kind is None:
            why = f"attention implementation {impl} takes no block mask from the caller"
        elif getattr(config, "alibi", False) or "alibi" in str(getattr(config, "position_embedding_type", "")):
            why = "ALiBi builds its position bias from a 2-D padding mask"
        elif missing := patches.missing_params(forward, ("attention_mask", "position_ids")):
            why = f"{type(model).__name__}.forward takes no {', '.join(missing)}"
        else:
            return kind
        patches.not_applicable("lm_eval_shared_context", why)
        return None

    def _score_shared(self, requests: list[Request], groups: list[Group], override_bs: int | None,
                      pbar: Any) -> Iterator[tuple[int, tuple[float, bool]]]:
        """(request index, answer) for every request of `groups`, each group one packed row.

        The first batch this instance scores is also scored unshared and compared: a model whose attention ignores
        or misreads the block mask (a custom model, a changed transformers) gives other numbers there, and then
        every request takes the unshared path, with one warning line.
        """
        from oasst_model import patches

        if override_bs or self.batch_size != "auto":
            budget, per_batch = None, override_bs or int(self.batch_size)
        else:
            budget, per_batch = self._batch_tokens(max(g.length for g in groups)), None
        chunks = list(batches(groups, budget, per_batch, self.max_rows))
        pending: _Batch | None = None
        for n, chunk in enumerate(chunks):
            batch = self._run_shared(chunk, requests)
            if n == 0 and not self.shared_stats["checked"]:
                # Once per instance: the attention path does not change between tasks or with the adapter.
                problem, reference = self._check_shared(batch, requests)
                if problem is not None:
                    patches.fallback("lm_eval_shared_context", problem, seen_at_run_time=True)
                    self.shared_context = False
                    yield from self._count(reference, pbar)
                    done = {i for i, _ in reference}
                    rest = sorted(i for each in chunks for group in each for members in group.members
                                  for i in members if i not in done)
                    answers = self._score_unshared([requests[i] for i in rest], override_bs, self.max_length, pbar)
                    yield from zip(rest, answers, strict=True)
                    return
                patches.activated("lm_eval_shared_context", once=True)
            if pending is not None:
                yield from zip(pending.indices or [], self._finish(pending, pbar), strict=True)
            pending = batch
        if pending is not None:
            yield from zip(pending.indices or [], self._finish(pending, pbar), strict=True)

    def _check_shared(self, batch: _Batch,
                      requests: list[Request]) -> tuple[str | None, list[tuple[int, tuple[float, bool]]]]:
        """(None, []) when the shared answers of the first CHECK_REQUESTS requests of `batch` equal the unshared
        ones up to rounding of the model's dtype; else (what differs, the unshared answers of those requests)."""
        import torch
        from tqdm import tqdm

        assert batch.indices is not None
        answered, self.answered = self.answered, None
        try:
            quiet = tqdm(disable=True)
            ours = self._finish(batch, quiet)  # reads the batch only: it is finished again, counted, later
            indices = sorted(batch.indices[:CHECK_REQUESTS])
            theirs = dict(zip(indices, self._score_unshared([requests[i] for i in indices], None,
                                                            self.max_length, quiet), strict=True))
        finally:
            self.answered = answered
        dtype = getattr(self.model, "dtype", torch.float32)
        atol, rtol = (1e-3, 1e-4) if dtype in (torch.float32, torch.float64) else (0.05, 0.01)
        worst, where = 0.0, None
        for i, (value, _) in zip(batch.indices, ours, strict=True):
            if i not in theirs:
                continue
            diff = abs(value - theirs[i][0])
            if diff > worst:
                worst = diff
            if diff > atol + rtol * abs(theirs[i][0]) and where is None:
                where = (i, value, theirs[i][0])
        self.shared_stats["checked"] += len(theirs)
        self.shared_stats["max_abs_diff"] = max(worst, self.shared_stats["max_abs_diff"] or 0.0)
        if where is None:
            return None, []
        i, value, expected = where
        return (f"request {i}: shared log-likelihood {value:.4f}, unshared {expected:.4f}; the model's attention "
                "does not honour a block mask"), list(theirs.items())

    def _count(self, answers: list[tuple[int, tuple[float, bool]]],
               pbar: Any) -> Iterator[tuple[int, tuple[float, bool]]]:
        """`answers` as they are, counted on the progress bar (they were computed with it off)."""
        pbar.update(len(answers))
        if self.answered is not None:
            self.answered(len(answers))
        yield from answers

    def _run_shared(self, chunk: list[Group], requests: list[Request]) -> _Batch:
        """Queue the packed rows of `chunk` on the device, as `_run` does for unshared rows."""
        import torch

        from oasst_eval.fastlm import _Batch, _to_device

        packed = pack(chunk)
        gather: list[int] = []
        answers, greedy_starts, tokens, rows, indices = [], [], [], [], []
        for group, spans in zip(chunk, packed.gather, strict=True):
            for continuation, members, span in zip(group.continuations, group.members, spans, strict=True):
                start = len(gather)
                gather.extend(span)
                for i in members:
                    answers.append((requests[i][0], len(tokens), len(continuation)))
                    greedy_starts.append(len(rows))
                    tokens.extend(continuation)
                    rows.extend(range(start, start + len(continuation)))
                    indices.append(i)
                    # Shared requests are never truncated: lm-eval's row is context + continuation[:-1].
                    self.shared_stats["unshared_tokens"] += len(requests[i][1]) + len(requests[i][2]) - 1
        self.shared_stats["requests"] += len(indices)
        self.shared_stats["tokens"] += int((packed.segments >= 0).sum())
        device = self.device
        row_index = _to_device(torch.tensor(rows, dtype=torch.long), device)
        batch = _Batch(answers=answers, greedy_starts=greedy_starts,
                       tokens=_to_device(torch.tensor(tokens, dtype=torch.long), device),
                       logprob_rows=row_index, greedy_rows=row_index, indices=indices)
        segments = _to_device(packed.segments, device)
        kind = MASK_KINDS[self.model.config._attn_implementation]
        dtype = self.mixed_precision_dtype or getattr(self.model, "dtype", torch.float32)
        mask = block_mask(segments, kind, dtype)
        batch.score(self._head_logits(_to_device(packed.input_ids, device), _to_device(torch.tensor(gather), device),
                                      attention_mask=mask, position_ids=_to_device(packed.position_ids, device)),
                    self.softmax_dtype)
        return batch
