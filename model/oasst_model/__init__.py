"""The model layer shared by `oasst train`, `merge`, `generate`, `chat` and `oasst eval`: how a base model (+ adapter)
is loaded (`load`: 4-bit with Falcon's fix, GGUF, pad token, adapters), the patches of other libraries' internals and
their registry (`patches`, `attention`, `lora_fused`, `casts`).

Nothing heavy at import: torch, transformers, peft and bitsandbytes load inside the functions that use them.
"""
