"""One model load at a time in a process.

transformers' from_pretrained is not thread-safe: while it builds a model it swaps process-wide
state and puts it back afterwards (PreTrainedModel.tie_weights and init_weights become no-ops,
torch.nn.init's functions are replaced, torch's default dtype is set). Two loads that overlap
restore each other's replacements, so the process keeps untied embeddings and no-op weight
initialization for good: the next T5 loads with its lm_head on the meta device
(huggingface/transformers#41782; the contextvar fix, #44940, is not released). Every
from_pretrained and from_config in lorag (generators, the GGUF conversion, encoders,
training's base) runs under this lock; a load
takes seconds and happens at start, on an index switch or in a training run, so nothing waits on
it in the request path.
"""

from __future__ import annotations

import threading

MODEL_LOADS = threading.Lock()
