"""`FastHFLM` gives lm-eval's own loglikelihoods, and the lm-eval speed-ups change no text or document."""

from __future__ import annotations

from pathlib import Path

import pytest

# Two continuations of one context share context + continuation[:-1]: lm-eval scores them from one row
# (its one-token logits cache), the path where it expands logits per request.
PAIRS = [
    ("Once upon a time, there was a", " little girl"),
    ("Once upon a time, there was a", " dog"),
    ("Once upon a time, there was a", " cat"),
    ("Lily liked to play ", "outside with her ball."),
    ("The sun", " was big and yellow and warm."),
    ("", "Tom went to the park."),
]


def _instances(pairs: list[tuple[str, str]]) -> list[object]:
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0) for p in pairs]


@pytest.fixture(scope="module")
def stories_model(stories: Path) -> tuple[object, object]:
    from oasst_model.load import load_model

    return load_model(str(stories), compute_dtype="float32")


@pytest.mark.parametrize("batch_size", [1, 4, "auto"])
def test_fast_loglikelihoods_equal_hflm(stories_model: tuple[object, object], batch_size: int | str) -> None:
    from lm_eval.models.huggingface import HFLM

    from oasst_eval.fastlm import FastHFLM

    model, tokenizer = stories_model
    requests = _instances(PAIRS * 3)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(requests)
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_tokens=64)
    ours = lm.loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    # Same positions, same tokens; only the head's matrix shape differs, so fp32 rounding at most.
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5, abs=1e-5)


def test_batched_tokenization_equals_encode_pair(stories_model: tuple[object, object]) -> None:
    from lm_eval.models.huggingface import HFLM

    from oasst_eval.fastlm import FastHFLM

    model, tokenizer = stories_model
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    expected = [reference._encode_pair(c, k) for c, k in PAIRS if c]
    lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    seen: list[tuple[list[int], list[int]]] = []
    lm._loglikelihood_tokens = lambda reqs, **_: seen.extend((c, k) for _, c, k in reqs) or [(0.0, False)] * len(reqs)
    lm.loglikelihood(_instances([p for p in PAIRS if p[0]]))
    assert seen == expected


def _hellaswag_strings() -> list[str]:
    """Contexts and context + ending strings of the HellaSwag fixture, as lm-eval's requests hold them."""
    from tests.core.conftest import read_jsonl

    rows = read_jsonl(Path(__file__).resolve().parents[2] / "fixtures" / "hellaswag" / "validation.jsonl")
    return [s for row in rows for s in [row["ctx"]] + [row["ctx"] + " " + e for e in row["endings"]]]


@pytest.mark.parametrize("add_special", [None, False])
@pytest.mark.parametrize("which", ["stories", "falcon"])
def test_backend_token_ids_equal_the_tokenizers_own(stories: Path, which: str, add_special: bool | None) -> None:
    from transformers import AutoTokenizer

    from oasst_eval.fastlm import BACKEND_CHECK, _token_ids
    from oasst_model import patches
    from tests.conftest import FALCON_TOKENIZER

    if which == "falcon" and not FALCON_TOKENIZER.is_dir():
        pytest.skip(f"{FALCON_TOKENIZER} not present")
    # Llama's adds a BOS token (add_special None); Falcon's adds nothing.
    tokenizer = AutoTokenizer.from_pretrained(str(stories if which == "stories" else FALCON_TOKENIZER))
    strings = _hellaswag_strings()
    assert len(strings) > 10 * BACKEND_CHECK
    kwargs = {} if add_special is None else {"add_special_tokens": add_special}
    patches.begin_run()
    assert _token_ids(tokenizer, strings, add_special) == tokenizer(strings, **kwargs)["input_ids"]
    assert patches.report()["lm_eval_backend_tokenize"]["state"] == "active"


def test_a_backend_that_disagrees_leaves_the_tokenizers_own_call(stories: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoTokenizer

    import oasst_eval.fastlm as fastlm
    from oasst_model import patches

    tokenizer = AutoTokenizer.from_pretrained(str(stories))
    strings = _hellaswag_strings()
    real = fastlm._backend_ids
    calls = []

    def shifted(backend: object, texts: list[str], add_special: bool) -> list[list[int]]:
        calls.append(len(texts))
        return [[i + 1 for i in ids] for ids in real(backend, texts, add_special)]

    monkeypatch.setattr(fastlm, "_backend_ids", shifted)
    patches.begin_run()
    assert fastlm._token_ids(tokenizer, strings, None) == tokenizer(strings)["input_ids"]
    assert calls == [fastlm.BACKEND_CHECK]  # the check only: the rest took the tokenizer's own call
    assert patches.report()["lm_eval_backend_tokenize"]["state"] == "fallback"
    assert "warning: patch lm_eval_backend_tokenize is off: LlamaTokenizer" in capsys.readouterr().err


def test_cached_templates_render_the_same_text() -> None:
    from lm_eval import utils

    from oasst_eval.fastlm import cache_jinja_templates

    doc = {"query": "A man is sitting on a roof. He", "label": 3}
    before = [utils.apply_template(t, doc) for t in ("{{query}}", "{{label}}")]
    undo = cache_jinja_templates()
    try:
        assert [utils.apply_template(t, doc) for t in ("{{query}}", "{{label}}", "{{query}}")] == before + before[:1]
    finally:
        undo()


def test_hellaswag_docs_processed_once_and_identical() -> None:
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    from oasst_eval.data import hellaswag_process_docs, read_jsonl

    rows = list(read_jsonl(Path(__file__).resolve().parents[2] / "fixtures" / "hellaswag" / "validation.jsonl"))
    dataset = datasets.Dataset.from_list(rows)
    first = hellaswag_process_docs(dataset)
    assert hellaswag_process_docs(dataset) is first
    assert first.to_list() == process_docs(dataset).to_list()


@pytest.mark.parametrize(("free_gib", "probed"), [(60, False), (0.5, True)])
def test_the_probe_batch_runs_only_where_the_cap_may_not_fit(stories_model: tuple[object, object],
                                                            monkeypatch: pytest.MonkeyPatch, free_gib: float,
                                                            probed: bool) -> None:
    """On a GPU the token budget comes from a probe forward; where a generous bound of its per-token memory shows
    the cap fits, the cap is taken without it (the probe could only have answered the cap). The GPU is faked: its
    memory figures, and a probe that says it ran."""
    import torch

    from oasst_eval import fastlm

    model, tokenizer = stories_model
    lm = fastlm.FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size="auto", max_batch_tokens=16384)
    monkeypatch.setattr(lm, "_device", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * 2**30), 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)

    class Probed(Exception):
        pass

    def probe(*args: object, **kwargs: object) -> None:
        raise Probed

    monkeypatch.setattr(torch, "ones", probe)  # the probe batch's first step
    if probed:
        with pytest.raises(Probed):
            lm._batch_tokens(200)
    else:
        assert lm._batch_tokens(200) == 16384
    per_token = fastlm.probe_bytes_per_token(model.config, 200)
    assert (fastlm.BOUND_MARGIN * 16384 * per_token <= fastlm.MEMORY_SHARE * free_gib * 2**30) is not probed


def _peak_bytes_per_token(model: object, rows: int, length: int) -> float:
    """Peak bytes of the tensors alive during one probe-like forward (every position's log-softmax and argmax),
    per token, counted by a dispatch mode that sees every tensor torch makes (freed when its last view dies)."""
    import weakref

    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Peak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                    if key in self.seen or size == 0:
                        continue
                    self.seen.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)

                    def freed(key: int = key, size: int = size) -> None:
                        self.live -= size
                        self.seen.discard(key)

                    weakref.finalize(tensor, freed)
            return out

    with torch.no_grad(), Peak() as peak:
        logits = model(torch.ones((rows, length), dtype=torch.long)).logits  # use_cache as lm-eval leaves it
        F.log_softmax(logits, dim=-1).argmax(dim=-1)
    return peak.peak / (rows * length)


@pytest.mark.parametrize("shape", ["stories260K", "deep-many-kv-heads"])
def test_the_per_token_bound_is_above_a_measured_forward(stories_model: tuple[object, object], shape: str) -> None:
    """The bound that lets the probe be skipped holds for a real forward, in fp32 (4 bytes a value, its own
    worst case), with the key/value cache HF models build: stories260K, and a Llama as deep for its width as a
    65B one with a key/value head per attention head (where the cache dominates)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from oasst_eval.fastlm import probe_bytes_per_token

    model = stories_model[0]
    if shape != "stories260K":
        config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=40,
                             num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager")
        model = LlamaForCausalLM(config).float().eval()
    measured = _peak_bytes_per_token(model, rows=2, length=64)
    bound = probe_bytes_per_token(model.config, 64)
    assert measured <= bound, (measured, bound)
    assert bound < 4 * measured  # a bound, not a refusal to ever skip the probe
