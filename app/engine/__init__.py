"""The request engine: one model thread, a queue, dynamic batching across adapters."""
