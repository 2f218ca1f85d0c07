"""lorag: retrieval-augmented generation with hot-swappable per-task LoRA adapters."""

import logging

__version__ = "0.1.0"

# bitsandbytes, imported by peft, warns at import that an optional CPU kernel package is
# missing; QLoRA training works without it and serving never uses it. Silenced here, before
# any entry point imports peft, so every command starts without the noise.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
