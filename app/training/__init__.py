"""Training LoRA adapters: data checks, objectives, the loop, evaluation, atomic save."""
