"""lorag: retrieval-augmented generation with hot-swappable per-task LoRA adapters."""

__version__ = "0.1.0"
