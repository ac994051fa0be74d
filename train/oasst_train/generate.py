"""The chatbot the classic notebook promised: a base model + adapter answering in the format it was trained in.

    bot = Chatbot.load(Path("runs/stories"))                     # the format train_config.yaml records
    bot = Chatbot.load(Path("runs/stories"), format="guanaco")   # or another one
    result = bot.reply("Tell me a story.", stream=print)

Guanaco: generation stops at EOS or when the model starts the next human turn (`conversation.HUMAN_STOP`); the
marker is never shown. Chat templates: the prompt is the template's generation prompt after the conversation so far,
and generation stops at EOS or the token that ends a turn (`<|im_end|>`, `<|eot_id|>`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oasst_model.spec import ModelSpec
from oasst_tools.conversation import HUMAN_STOP, chat_prompt, guanaco_prompt
from oasst_tools.errors import OasstError


@dataclass(frozen=True)
class Reply:
    """One generated answer and why it ended."""

    text: str
    stop: str  # "eos", "human_turn" (Guanaco), "end_of_turn" (chat templates) or "max_new_tokens"
    new_tokens: int


def base_settings(adapter: Path, **flags: Any) -> ModelSpec:
    """How the adapter's base model is loaded: what training recorded (train_config.yaml), with the loading flags
    that were given (None = not given) on top. Every file is checked before torch takes its seconds to import."""
    spec = ModelSpec.from_adapter(adapter, **flags)
    spec.check_model()  # a missing or damaged base is one line too
    return spec


def load_for_inference(adapter: Path, **flags: Any) -> tuple[Any, Any, ModelSpec]:
    """(base + adapter model in eval mode, tokenizer, spec) as the adapter was trained, unless `flags` say otherwise."""
    from oasst_model.spec import load

    spec = base_settings(adapter, **flags)
    model, tokenizer = load(spec)
    model.eval()
    return model, tokenizer, spec


@dataclass
class Chatbot:
    """A loaded model + tokenizer, the conversation format, and the conversation so far."""

    model: Any
    tokenizer: Any
    seed: int = 0
    format: str = "guanaco"  # noqa: A003 - the --format vocabulary
    history: str = ""  # Guanaco: the text so far
    messages: list[dict[str, str]] = field(default_factory=list)  # chat templates: the turns so far
    cudnn_attention: bool = False  # off: decoding meets a new key length at every token (oasst_model.attention)
    _max_context: int = field(default=2048)

    @classmethod
    def load(cls, adapter: Path, seed: int = 0, format: str | None = None,  # noqa: A002 - the --format vocabulary
             cudnn_attention: bool = False, **flags: Any) -> Chatbot:
        """A chatbot on the adapter's base model, loaded as trained (4-bit stays 4-bit) unless loading `flags` say
        otherwise, in the format the adapter was trained in unless `format` says otherwise."""
        from oasst_model.spec import load, recorded_format
        from oasst_tools.conversation import resolve_format

        spec = base_settings(adapter, **flags)  # the adapter and its record are checked before the format is read
        requested = format or recorded_format(adapter)
        model, tokenizer = load(spec)
        model.eval()
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        return cls(model=model, tokenizer=tokenizer, seed=seed, format=resolve_format(requested, tokenizer),
                   cudnn_attention=cudnn_attention, _max_context=int(limit))

    def context(self, prompt: str) -> str:
        """The text the model continues to answer `prompt` after the conversation so far, in the bot's format."""
        if self.format == "guanaco":
            return self.history + guanaco_prompt(prompt)
        return chat_prompt(self.tokenizer, [*self.messages, {"role": "user", "content": prompt}], "--prompt")

    def reply(self, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
              stream: Callable[..., Any] | None = None, keep: bool = False) -> Reply:
        """Answer `prompt` (after the history when `keep`), streaming text pieces to `stream(text, nl=False)`."""
        import torch

        from oasst_model.attention import cudnn_sdpa
        from oasst_tools.conversation import turn_end_ids

        guanaco = self.format == "guanaco"
        context = self.context(prompt)
        # A rendered chat template already holds its special tokens (BOS included, where it writes one).
        ids = self.tokenizer(context, return_tensors="pt", add_special_tokens=guanaco).input_ids
        budget = self._max_context - max_new_tokens
        if budget < 1:
            raise OasstError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt "
                             f"(the model reads at most {self._max_context} tokens)")
        ids = ids[:, -budget:]  # oldest turns fall out of the window first
        device = next(self.model.parameters()).device
        streamer = _GuanacoStreamer(self.tokenizer, stream, marker=HUMAN_STOP if guanaco else None)
        eos = self.tokenizer.eos_token_id
        ends = [] if guanaco else [i for i in turn_end_ids(self.tokenizer) if i != eos]
        stops = {"stop_strings": [HUMAN_STOP], "tokenizer": self.tokenizer} if guanaco else {}
        torch.manual_seed(self.seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode(), cudnn_sdpa(self.cudnn_attention):
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=max_new_tokens, streamer=streamer, eos_token_id=[eos, *ends],
                pad_token_id=self.tokenizer.pad_token_id, **stops, **sampling,
            )
        new = out[0, ids.shape[1]:].tolist()
        text = streamer.text
        if new and new[-1] == eos:
            stop = "eos"
        elif new and new[-1] in ends:
            stop = "end_of_turn"
        elif streamer.saw_human:
            stop = "human_turn"
        else:
            stop = "max_new_tokens"
        if keep and guanaco:
            self.history = context + text
        elif keep:
            self.messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text.strip()}]
        return Reply(text=text, stop=stop, new_tokens=len(new))


class _GuanacoStreamer:
    """A transformers streamer that emits decoded text as it grows, holding back a possible start of the
    human marker (`marker`; None: no marker to hold back, as in chat templates)."""

    def __init__(self, tokenizer: Any, emit: Callable[..., Any] | None, marker: str | None = HUMAN_STOP) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.marker = marker
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
        marker = self.marker or ""
        cut = text.find(marker) if marker else -1
        if cut >= 0:
            text, final, self.saw_human = text[:cut], True, True
        self.text = text
        limit = len(text)
        if not final:
            # Hold back a tail that may grow into the human marker or into a multi-byte character.
            limit -= next((n for n in range(min(len(marker), len(text)), 0, -1)
                           if marker.startswith(text[-n:])), 0)
            while limit > self._sent and text[limit - 1] == "\ufffd":
                limit -= 1
        if limit > self._sent and self.emit is not None:
            self.emit(text[self._sent:limit], nl=False)
            self._sent = limit
