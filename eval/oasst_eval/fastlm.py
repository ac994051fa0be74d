"""lm-eval's `HFLM` with the same loglikelihood semantics and far less work per request.

`FastHFLM` replaces only the loglikelihood path of lm-eval 0.4.13's `HFLM` for decoder-only models:
- the LM head and log_softmax run only on the positions lm-eval reads (the continuation tokens), not on every
  position of every padded row (a 65k-vocabulary Falcon spends most of a batch's memory on those logits);
- one host<->device transfer per batch instead of one per request (lm-eval builds each row on the device and
  reads two scalars back per request, each a sync), and the next batch is queued before the previous batch's
  results are read, so the GPU does not idle while Python does the bookkeeping;
- `batch_size="auto"` means a token budget per batch measured from GPU memory, not lm-eval's row-count search
  (capped at 64 rows and sized for full-vocabulary logits this class never builds);
- the (context, continuation) pairs are tokenized in one batched call, each distinct string once;
- with `shared_context` (the default), the requests of one context (a multiple-choice item's choices) are scored
  from one packed row with a block mask: the context runs once (oasst_eval.shared). Checked on the first batch
  against the unshared path; a model whose attention does not honour the mask falls back with one warning.

Everything that decides a score is lm-eval's: its `Collator` order and context grouping, its truncation, its
right padding with id 0, `log_softmax(dtype=softmax_dtype)` then `argmax` for the greedy check, the leading
slice of the gather for grouped continuations, and the sum rounded to the log-softmax dtype.
Usage (what `oasst_eval.run` does):

    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size="auto")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, _add_special_kwargs, has_bos_prefix
from tqdm import tqdm

from oasst_eval import shared
from oasst_eval.data import document_origin, move_trailing_space
from oasst_tools.errors import OasstError

log = logging.getLogger(__name__)

Request = tuple[tuple[str, str] | None, list[int], list[int]]
# Default cap of the token budget per batch with `batch_size="auto"` (rows x padded length). Batches are cut from
# requests sorted longest first, so a larger budget pads more: on the first 2,000 HellaSwag items with the Falcon
# tokenizer, 16,384 pads 4.8% over the real tokens in 22 batches, 65,536 pads 17.8% in 6 (batch 64: 1.4%, 125).
MAX_BATCH_TOKENS = 16384
# Share of the free GPU memory the measured budget may fill: leaves room for fragmentation and the allocator.
MEMORY_SHARE = 0.7
# Margin on the per-token memory bound under which the cap is taken without a probe batch (`_cap_surely_fits`).
BOUND_MARGIN = 2
_PLACEHOLDER = torch.empty(1, 1, 1)  # Collator.get_cache wants logits only to expand them; ours live elsewhere


@dataclass
class _Batch:
    """One batch on its way through the model: what to read back and how to turn it into answers."""

    answers: list[tuple[tuple[str, str] | None, int, int]]  # (request strings, first logprob index, length)
    greedy_starts: list[int]  # index of each answer's first greedy-check position in the gathered rows
    tokens: torch.Tensor  # continuation token of every gathered logprob, on the device
    logprob_rows: torch.Tensor  # gathered row index of every logprob
    greedy_rows: torch.Tensor  # gathered row index of every greedy check
    logprobs: torch.Tensor | None = None  # filled once the model ran
    greedy_ok: torch.Tensor | None = None
    indices: list[int] | None = None  # shared path: the request index of each answer
    # On a GPU: host copies of logprobs (float64) and greedy_ok, queued right behind this batch's kernels, and the
    # event that marks them done.
    host: tuple[torch.Tensor, torch.Tensor] | None = None
    ready: Any = None

    def score(self, logits: torch.Tensor, softmax_dtype: torch.dtype) -> None:
        """Fill `logprobs` and `greedy_ok` from the gathered logits [gathered, vocab], as lm-eval computes them,
        and on a GPU queue their copy to the host at once."""
        logp = F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
        self.logprobs = logp[self.logprob_rows, self.tokens]
        self.greedy_ok = logp.argmax(dim=-1)[self.greedy_rows] == self.tokens
        if self.logprobs.is_cuda:
            # Queued now, the copies wait for this batch only. Read later with `.cpu()` they would be queued behind
            # the next batch, which the caller launches first: the read waited for both and the GPU idled while
            # the host built the batch after (11 stretches of ~18 ms over 2,000 HellaSwag items on an H200).
            # On the stream of the tensors' own device (cuda:1 need not be the current device).
            stream = torch.cuda.current_stream(self.logprobs.device)
            with torch.cuda.stream(stream):
                self.host = (_to_host(self.logprobs.double()), _to_host(self.greedy_ok))
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """(logprobs as float64, greedy_ok) on the host: waits for this batch's own copies only."""
        assert self.logprobs is not None and self.greedy_ok is not None
        if self.host is not None:
            self.ready.synchronize()
            return self.host[0].numpy(), self.host[1].numpy()
        return self.logprobs.double().cpu().numpy(), self.greedy_ok.cpu().numpy()


class FastHFLM(shared.SharedContextScoring, HFLM):
    """`HFLM` whose loglikelihood computes logits only where lm-eval reads them (decoder-only models)."""

    def __init__(self, *args: Any, max_batch_tokens: int = MAX_BATCH_TOKENS, max_rows: int | None = None,
                 shared_context: bool = True, **kwargs: Any) -> None:
        """As `HFLM`; with `batch_size="auto"`, batches hold at most `max_batch_tokens` tokens and `max_rows` rows;
        `shared_context`: score the choices of one context from one packed row (oasst_eval.shared)."""
        super().__init__(*args, **kwargs)
        self.max_batch_tokens = max_batch_tokens
        self.max_rows = max_rows
        self.shared_context = shared_context
        # What the shared path did: requests scored shared, model tokens fed, and its first-batch check against
        # the unshared path (requests compared, largest log-likelihood difference); eval_summary.json keeps it.
        self.shared_stats: dict[str, Any] = {"requests": 0, "tokens": 0, "unshared_tokens": 0, "checked": 0,
                                             "max_abs_diff": None}
        self.batch_tokens: int | None = None  # measured on the first auto-sized batch, then kept
        # Wall seconds inside loglikelihood: tokenizing, and scoring until the last answer is read back (GPU work
        # included). The rest of a simple_evaluate is lm-eval's own (requests, metrics): eval_summary.json keeps it.
        self.seconds: dict[str, float] = {"tokenize": 0.0, "score": 0.0}
        # Called with the number of lm-eval requests each batch answered, in place of the tqdm bar (set by
        # oasst_eval.progress, which draws one bar over every request of a model).
        self.answered: Callable[[int], None] | None = None
        self._instances: Sequence[Any] = ()  # the lm-eval requests being scored, to name a bad one's document

    # ---- tokenization -------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's `TemplateLM.loglikelihood`, tokenizing every distinct string once, in one batched call."""
        self._instances = requests
        if self.backend != "causal" or not getattr(self.tokenizer, "is_fast", False) or self.enable_thinking:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        started = time.perf_counter()
        pairs = [req.args for req in requests]
        split = [move_trailing_space(context, continuation) for context, continuation in pairs]
        encoded = self._encode_all([s for c, k in split if c for s in (c + k, c)])
        new_reqs: list[Request] = []
        for (context, continuation), (raw_context, raw_continuation) in zip(split, pairs, strict=True):
            if context == "":
                # Empty context: lm-eval's own branch (prefix token), rare enough to keep per request.
                continuation_enc = self.tok_encode(raw_continuation, add_special_tokens=False)
                context_enc, continuation_enc = (
                    ([self.prefix_token_id], continuation_enc) if self.prefix_token_id != continuation_enc[0]
                    else (continuation_enc[:1], continuation_enc[1:])
                )
            else:
                whole, context_enc = encoded[context + continuation], encoded[context]
                continuation_enc = whole[len(context_enc):]
            new_reqs.append(((raw_context, raw_continuation), context_enc, continuation_enc))
        scoring = time.perf_counter()
        self.seconds["tokenize"] += scoring - started
        answers = self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)
        self.seconds["score"] += time.perf_counter() - scoring
        return answers

    def _encode_all(self, strings: Sequence[str]) -> dict[str, list[int]]:
        """`HFLM.tok_encode` of each distinct string, batched per set of special-token arguments."""
        bos = self.tokenizer.decode(self.prefix_token_id)
        groups: dict[bool | None, list[str]] = {}
        for string in dict.fromkeys(strings):
            kwargs = _add_special_kwargs(None, self.add_bos_token)
            if has_bos_prefix(string, bos):
                kwargs["add_special_tokens"] = False
            groups.setdefault(kwargs.get("add_special_tokens"), []).append(string)
        from oasst_model.quiet import tokenizer_threads

        out: dict[str, list[int]] = {}
        for add_special, group in groups.items():
            with tokenizer_threads():  # 10,000 HellaSwag strings: ~1 s on one thread
                out.update(zip(group, _token_ids(self.tokenizer, group, add_special), strict=True))
        return out

    # ---- scoring ------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """`HFLM._loglikelihood_tokens` for decoder-only models, logits only at the continuation positions."""
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        max_length = self.max_length  # a property that re-reads the model config on every access
        too_long = next((req for req in requests if len(req[2]) > max_length), None)
        if too_long is not None:
            # No window holds it: lm-eval's own path fails on a shape mismatch, this one on its own check.
            raise OasstError(f"{self._origin(too_long)}: a choice of {len(too_long[2]):,} tokens is longer than the "
                             f"model's {max_length:,}-token window, so no window can score it (nor can lm-eval): "
                             "shorten it or leave that row out")
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0 or self.answered is not None),
                    desc="Running loglikelihood requests")
        groups, rest = [], list(range(len(requests)))
        if self.shared_context and self._mask_kind() is not None:
            groups, rest = shared.plan(requests, max_length)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        if groups:
            for i, answer in self._score_shared(requests, groups, override_bs, pbar):
                answers[i] = answer
        if rest:
            subset = [requests[i] for i in rest]
            for i, answer in zip(rest, self._score_unshared(subset, override_bs, max_length, pbar), strict=True):
                answers[i] = answer
        pbar.close()
        assert all(a is not None for a in answers)
        return answers  # type: ignore[return-value]

    def _origin(self, request: Request) -> str:
        """Where a request's document was read (`FILE:LINE`, or the task and document number) and which choice."""
        instance = next((i for i in self._instances if tuple(i.args) == request[0]), None)
        if instance is None:
            return "a loglikelihood request"
        return f"{document_origin(instance.task_name, instance.doc_id)} (choice {instance.idx})"

    def _score_unshared(self, requests: list[Request], override_bs: int | None, max_length: int,
                        pbar: Any) -> list[tuple[float, bool]]:
        """lm-eval's row per request (its order, grouping and truncation), logits only where they are read."""

        def sort_key(req: Request) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=sort_key, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        ordered = [req for chunk in re_ord.get_batched(n=0) for req in chunk]
        res: list[tuple[float, bool]] = []
        pending: _Batch | None = None
        for chunk in self._chunks(ordered, override_bs, max_length):
            batch = self._run(chunk, re_ord, max_length)
            if pending is not None:
                # Read the previous batch back only now: its GPU work overlapped with building this one.
                res.extend(self._finish(pending, pbar))
            pending = batch
        if pending is not None:
            res.extend(self._finish(pending, pbar))
        return re_ord.get_original(res)

    def _chunks(self, ordered: list[Request], override_bs: int | None, max_length: int) -> Iterator[list[Request]]:
        """Fixed-size batches, or token-budget batches (rows x padded length) for `batch_size="auto"`."""
        if override_bs or self.batch_size != "auto":
            size = override_bs or int(self.batch_size)
            for i in range(0, len(ordered), size):
                yield ordered[i:i + size]
            return
        i = 0
        while i < len(ordered):
            # Requests come longest first, so the first row of a batch sets its padded length.
            length = len(_input_tokens(ordered[i], max_length))
            budget = self._batch_tokens(length)
            rows = max(1, min(budget // length, self.max_rows or budget))
            yield ordered[i:i + rows]
            i += rows

    def _run(self, chunk: list[Request], re_ord: Collator, max_length: int) -> _Batch:
        """Queue one batch on the device; returns what `_finish` needs to read the answers back."""
        inputs = [_input_tokens(req, max_length) for req in chunk]
        width = len(max(inputs, key=len))
        rows = torch.zeros((len(chunk), width), dtype=torch.long)  # pad_and_concat pads right with id 0
        gather: list[int] = []  # flat (row * width + position) of every position whose logits are needed
        answers, greedy_starts, tokens, logprob_rows, greedy_rows = [], [], [], [], []
        for r, ((request_str, context, continuation), inp) in enumerate(zip(chunk, inputs, strict=True)):
            assert context and continuation and len(continuation) <= max_length
            rows[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            start = len(gather)
            # Logits at inplen - contlen .. inplen - 1 predict the continuation (HFLM._select_cont_toks).
            gather.extend(r * width + p for p in range(len(inp) - len(continuation), len(inp)))
            for req_str, cont, _ in re_ord.get_cache(req_str=request_str, cxt_toks=context,
                                                     cont_toks=continuation, logits=_PLACEHOLDER):
                # lm-eval gathers the leading len(cont) positions but checks greedy on the trailing ones.
                answers.append((req_str, len(tokens), len(cont)))
                greedy_starts.append(len(greedy_rows))
                tokens.extend(cont)
                logprob_rows.extend(range(start, start + len(cont)))
                greedy_rows.extend(range(len(gather) - len(cont), len(gather)))
        device = self.device
        batch = _Batch(
            answers=answers, greedy_starts=greedy_starts,
            tokens=_to_device(torch.tensor(tokens, dtype=torch.long), device),
            logprob_rows=_to_device(torch.tensor(logprob_rows, dtype=torch.long), device),
            greedy_rows=_to_device(torch.tensor(greedy_rows, dtype=torch.long), device),
        )
        batch.score(self._head_logits(_to_device(rows, device), _to_device(torch.tensor(gather), device)),
                    self.softmax_dtype)
        return batch

    def _head_logits(self, rows: torch.Tensor, gather: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        """Logits [len(gather), vocab] of the flat positions `gather`, the head applied to those positions only.

        A pre-hook on the output embedding picks the positions out of the final hidden states, so the model's own
        forward (and anything it does after the head, such as logit soft-capping or scaling) stays in charge.
        """
        head = self.model.get_output_embeddings()
        shapes: list[torch.Size] = []

        def pick(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0]
            shapes.append(hidden.shape)
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather).unsqueeze(0), *args[1:])

        handle = head.register_forward_pre_hook(pick)
        try:
            if model_kwargs:
                # HFLM._model_call's no_grad and autocast, with the mask and positions it cannot pass.
                with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                     enabled=self.mixed_precision_dtype is not None):
                    logits = self.model(input_ids=rows, **model_kwargs).logits
            else:
                logits = self._model_call(rows)
        finally:
            handle.remove()
        if len(shapes) != 1 or tuple(shapes[0][:2]) != tuple(rows.shape) or logits.shape[:2] != (1, len(gather)):
            # Prompt-tuning virtual tokens or a head called more than once: positions would not line up.
            raise RuntimeError(f"{type(self.model).__name__}: the output head saw {[tuple(s) for s in shapes]} for "
                               f"input {tuple(rows.shape)}; FastHFLM needs one head call on [batch, length, hidden]")
        return logits[0]

    def _finish(self, batch: _Batch, pbar: Any) -> list[tuple[float, bool]]:
        """Read one batch back (one sync) and build lm-eval's (logprob sum, is greedy) answers in order."""
        values, greedy = batch.read()
        assert batch.logprobs is not None
        starts = np.fromiter((a[1] for a in batch.answers), dtype=np.int64, count=len(batch.answers))
        # lm-eval sums in the log-softmax dtype; a float64 sum rounded to that dtype is the same number or
        # one unit in the last place closer to the exact sum.
        sums = torch.from_numpy(np.add.reduceat(values, starts)).to(batch.logprobs.dtype).double().tolist()
        all_greedy = np.logical_and.reduceat(greedy, np.asarray(batch.greedy_starts, dtype=np.int64)).tolist()
        out = []
        for (request_str, _, _), total, ok in zip(batch.answers, sums, all_greedy, strict=True):
            answer = (total, bool(ok))
            out.append(answer)
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            pbar.update(1)
        if self.answered is not None:
            # Rolling windows (no request strings) are parts of a request lm-eval counts once, when it is whole.
            self.answered(sum(1 for answer in batch.answers if answer[0] is not None))
        return out

    # ---- batch size ---------------------------------------------------------------------------------------

    def _batch_tokens(self, length: int) -> int:
        """Token budget per batch: measured once from GPU memory, capped by `max_batch_tokens`."""
        if self.batch_tokens is None:
            self.batch_tokens = self._measure_batch_tokens(length)
            self.batch_sizes = {0: max(1, self.batch_tokens // length)}  # what lm-eval reports as batch_sizes
        return self.batch_tokens

    def _measure_batch_tokens(self, length: int) -> int:
        """Rows x length the free GPU memory holds, from the peak memory of one probe batch at `length` tokens.

        Activation memory grows linearly with rows at a fixed length; the probe uses the longest request, so
        shorter batches of the same token count need no more. CPU: the cap (an out-of-memory kills the process
        there instead of raising, so nothing can be probed).
        """
        cap = self.max_batch_tokens
        if self.device.type != "cuda":
            return cap
        if self._cap_surely_fits(cap, length):
            # The probe (a forward of up to 8,192 tokens with every position's logits, ~5% of a HellaSwag run on
            # an H100) could only answer the cap.
            log.info("batch token budget: cap %d (fits free memory by a bound; not measured)", cap)
            return cap
        rows = max(1, min(cap, 8192) // length)
        probe = torch.ones((rows, length), dtype=torch.long, device=self.device)
        gather = torch.arange(rows * length, device=self.device)  # every position: the worst case
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        F.log_softmax(self._head_logits(probe, gather), dim=-1, dtype=self.softmax_dtype).argmax(dim=-1)
        torch.cuda.synchronize(self.device)
        per_token = max(1, torch.cuda.max_memory_allocated(self.device) - before) / (rows * length)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = int(MEMORY_SHARE * free / per_token)
        log.info("batch token budget: %d measured (%.0f KiB per token), cap %d", budget, per_token / 1024, cap)
        return max(length, min(cap, budget))

    def _cap_surely_fits(self, cap: int, length: int) -> bool:
        """Whether `cap` tokens per batch fit the free GPU memory by a generous bound of the probe's per-token
        memory (`probe_bytes_per_token`) times BOUND_MARGIN; False when the model's config lacks a size (the probe
        decides then)."""
        per_token = probe_bytes_per_token(getattr(self.model, "config", None), length)
        if per_token is None:
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return BOUND_MARGIN * cap * per_token <= MEMORY_SHARE * free


def probe_bytes_per_token(config: Any, length: int) -> int | None:
    """An upper bound of the memory per token of one scoring forward at `length` tokens with every position's
    log-softmax, 4 bytes a value: three vocabulary-wide values (logits, log-softmax, its argmax), three MLP-wide
    ones (gated MLPs keep gate, up and their product), eight hidden-wide ones, two attention scores per head and
    position (as eager attention keeps them) and the key/value cache the model builds for every layer (HF models
    do unless told not to). None when the config lacks a size."""
    def size(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    vocab, hidden = size("vocab_size"), size("hidden_size", "n_embd", "d_model")
    heads, layers = size("num_attention_heads", "n_head"), size("num_hidden_layers", "n_layer", "num_layers")
    if None in (vocab, hidden, heads, layers):
        return None
    inner = size("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden
    # Falcon's multi_query (its 7B): one key/value head whatever num_kv_heads says.
    multi_query = getattr(config, "multi_query", False) is True and not getattr(config, "new_decoder_architecture",
                                                                                 False)
    kv_heads = 1 if multi_query else size("num_key_value_heads", "num_kv_heads") or heads
    head_dim = size("head_dim") or hidden // heads
    return 4 * (3 * vocab + 3 * inner + 8 * hidden + 2 * heads * length + 2 * layers * kv_heads * head_dim)


# Strings tokenized both ways (transformers' call and the backend's encode_batch) before the backend is trusted.
BACKEND_CHECK = 32


def _token_ids(tokenizer: Any, strings: list[str], add_special: bool | None) -> list[list[int]]:
    """`tokenizer(strings)["input_ids"]`, from the Rust backend's `encode_batch` once it gave the same ids for the
    first BACKEND_CHECK strings: transformers builds a Python encoding per string (HellaSwag's 10,000: 0.37 s of
    0.56 s on an H200 host, the GPU idle meanwhile). Registered as the `lm_eval_backend_tokenize` patch."""
    from oasst_model import patches

    kwargs = {} if add_special is None else {"add_special_tokens": add_special}
    backend = getattr(tokenizer, "_tokenizer", None)
    if len(strings) <= BACKEND_CHECK or not patches.applies("lm_eval_backend_tokenize",
                                                             problem=_backend_problem(backend)):
        return tokenizer(strings, **kwargs)["input_ids"]
    # transformers' call first: it also turns off truncation and padding a tokenizer.json may set on the backend.
    head = tokenizer(strings[:BACKEND_CHECK], **kwargs)["input_ids"]
    special = True if add_special is None else add_special
    if (backend.truncation is not None or backend.padding is not None
            or _backend_ids(backend, strings[:BACKEND_CHECK], special) != head):
        patches.fallback("lm_eval_backend_tokenize", f"{type(tokenizer).__name__}'s backend gives other ids than "
                         "its own call", seen_at_run_time=True)
        return head + tokenizer(strings[BACKEND_CHECK:], **kwargs)["input_ids"]
    patches.activated("lm_eval_backend_tokenize", once=True)
    return head + _backend_ids(backend, strings[BACKEND_CHECK:], special)


def _backend_ids(backend: Any, strings: list[str], add_special: bool) -> list[list[int]]:
    """Token ids of `strings` from a `tokenizers.Tokenizer`, in one batched call on its thread pool."""
    return [encoding.ids for encoding in backend.encode_batch(strings, add_special_tokens=add_special)]


def _backend_problem(backend: Any) -> str | None:
    """Why a tokenizer's backend cannot be called directly (None: it can)."""
    if backend is None or not callable(getattr(backend, "encode_batch", None)):
        return "the tokenizer has no Rust backend with encode_batch (a slow tokenizer)"
    return None


def _input_tokens(req: Request, max_length: int) -> list[int]:
    """lm-eval's model input: context + continuation, left-truncated to max_length + 1, minus the last token."""
    return (req[1] + req[2])[-(max_length + 1):][:-1]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of a GPU tensor, queued on the current stream (valid once the stream reaches it)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without blocking the host (pinned memory) when it is a GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def cache_jinja_templates() -> Callable[[], None]:
    """Make lm-eval compile each prompt template once instead of once per document; returns an undo function.

    lm-eval 0.4.13's `utils.apply_template` calls `Environment.from_string` on every call: for 2,000 HellaSwag
    items that is 14,000 template compilations in the timed span. Rendering a cached compiled template gives the
    same text. Registered as the `lm_eval_template_cache` patch: when lm-eval changed `apply_template`, nothing is
    replaced (one warning line). Delete when lm-eval caches compiled templates itself.
    """
    from functools import lru_cache

    from lm_eval import utils

    from oasst_model import patches

    if not patches.applies("lm_eval_template_cache"):
        return lambda: None
    patches.activated("lm_eval_template_cache")

    original = utils.apply_template
    compile_template = lru_cache(maxsize=256)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    utils.apply_template = apply_template

    def undo() -> None:
        utils.apply_template = original

    return undo
