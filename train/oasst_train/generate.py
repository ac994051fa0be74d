"""The chatbot the classic notebook promised: a base model + adapter answering in the Guanaco format.

    bot = Chatbot.load(Path("runs/stories"))
    result = bot.reply("Tell me a story.", stream=print)

Generation stops at EOS or when the model starts the next `### Human:` turn; the marker is never shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oasst_tools.errors import OasstError
from oasst_train.data import HUMAN, guanaco_prompt


@dataclass(frozen=True)
class Reply:
    """One generated answer and why it ended."""

    text: str
    stop: str  # "eos", "human_turn" or "max_new_tokens"
    new_tokens: int


def base_settings(adapter: Path, base: str | None = None) -> dict[str, Any]:
    """How the adapter's base model was loaded in training (model, 4-bit settings), from train_config.yaml."""
    from oasst_tools.files import read_yaml_mapping
    from oasst_model.load import check_source, read_adapter_config

    adapter_config = read_adapter_config(adapter)
    settings: dict[str, Any] = {"load_in_4bit": False, "compute_dtype": "float32"}
    config_file = adapter / "train_config.yaml"
    if config_file.exists():
        saved, _ = read_yaml_mapping(config_file, "training config", hint=" (it records how the base model was "
                                     "loaded; restore it or delete it and pass --model)")
        settings.update({k: saved[k] for k in ("model", "load_in_4bit", "compute_dtype", "quant_type",
                                               "double_quant", "trust_remote_code") if k in saved})
    else:
        settings["model"] = adapter_config.get("base_model_name_or_path")
    if base:
        settings["model"] = base
    if not settings.get("model"):
        raise OasstError(f"{adapter} does not name its base model; pass --model")
    if not isinstance(settings["model"], str):
        raise OasstError(f"{config_file}: model must be a string, not {settings['model']!r}")
    for key in ("load_in_4bit", "double_quant", "trust_remote_code"):
        if key in settings and not isinstance(settings[key], bool):
            raise OasstError(f"{config_file}: {key} must be true or false, not {settings[key]!r}")
    check_source(settings["model"])  # before torch loads: a missing or damaged base is one line too
    return settings


def load_for_inference(adapter: Path, base: str | None = None,
                       compute_dtype: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(base + adapter model in eval mode, tokenizer, settings) as the adapter was trained."""
    settings = base_settings(adapter, base)  # every file checked before torch takes its seconds to import

    import torch

    from oasst_model.load import load_adapter, load_model

    on_gpu = torch.cuda.is_available()
    model, tokenizer = load_model(
        settings["model"], load_in_4bit=settings["load_in_4bit"], compute_dtype=compute_dtype or settings["compute_dtype"],
        quant_type=settings.get("quant_type", "nf4"), double_quant=settings.get("double_quant", True),
        device_map={"": 0} if on_gpu else None, trust_remote_code=settings.get("trust_remote_code", False),
    )
    if (adapter / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(adapter)  # the pad token chosen in training
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OasstError(f"cannot load the tokenizer saved in {adapter}: {detail}") from None
    model = load_adapter(model, str(adapter))
    model.eval()
    return model, tokenizer, settings


@dataclass
class Chatbot:
    """A loaded model + tokenizer and the conversation so far."""

    model: Any
    tokenizer: Any
    seed: int = 0
    history: str = ""
    _max_context: int = field(default=2048)

    @classmethod
    def load(cls, adapter: Path, base: str | None = None, seed: int = 0) -> Chatbot:
        """A chatbot on the adapter's base model (4-bit when it was trained in 4-bit)."""
        model, tokenizer, _ = load_for_inference(adapter, base)
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        return cls(model=model, tokenizer=tokenizer, seed=seed, _max_context=int(limit))

    def reply(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
              stream: Callable[..., Any] | None = None, keep: bool = False) -> Reply:
        """Answer `prompt` (after the history when `keep`), streaming text pieces to `stream(text, nl=False)`."""
        import torch

        context = self.history + guanaco_prompt(prompt)
        ids = self.tokenizer(context, return_tensors="pt").input_ids
        budget = self._max_context - max_new_tokens
        if budget < 1:
            raise OasstError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt "
                             f"(the model reads at most {self._max_context} tokens)")
        ids = ids[:, -budget:]  # oldest turns fall out of the window first
        device = next(self.model.parameters()).device
        streamer = _GuanacoStreamer(self.tokenizer, stream)
        torch.manual_seed(self.seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=max_new_tokens, streamer=streamer, stop_strings=[HUMAN], tokenizer=self.tokenizer,
                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id, **sampling,
            )
        new = out[0, ids.shape[1]:].tolist()
        text = streamer.text
        if new and new[-1] == self.tokenizer.eos_token_id:
            stop = "eos"
        elif streamer.saw_human:
            stop = "human_turn"
        else:
            stop = "max_new_tokens"
        if keep:
            self.history = context + text
        return Reply(text=text, stop=stop, new_tokens=len(new))


class _GuanacoStreamer:
    """A transformers streamer that emits decoded text as it grows, holding back a possible `### Human:` start."""

    def __init__(self, tokenizer: Any, emit: Callable[..., Any] | None) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.text = ""
        self.saw_human = False
        self._prompt_skipped = False
        self._sent = 0

    def put(self, value: Any) -> None:
        """Receive new token ids (the first call carries the prompt, which is not echoed)."""
        if not self._prompt_skipped:
            self._prompt_skipped = True
            return
        self.ids.extend(int(i) for i in value.flatten().tolist())
        self._flush(final=False)

    def end(self) -> None:
        """Emit what is left and end the line."""
        self._flush(final=True)
        if self.emit is not None:
            self.emit("")

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = text.find(HUMAN)
        if cut >= 0:
            text, final, self.saw_human = text[:cut], True, True
        self.text = text
        limit = len(text)
        if not final:
            # Hold back a tail that may grow into "### Human:" or into a multi-byte character.
            limit -= next((n for n in range(min(len(HUMAN), len(text)), 0, -1) if HUMAN.startswith(text[-n:])), 0)
            while limit > self._sent and text[limit - 1] == "\ufffd":
                limit -= 1
        if limit > self._sent and self.emit is not None:
            self.emit(text[self._sent:limit], nl=False)
            self._sent = limit
