"""Adapter registry: validate, load, replace and unload PEFT LoRA adapters at runtime."""
