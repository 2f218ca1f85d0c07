"""The decoding modes, one module each: what a request does with each step's logits.

- concat: one row; greedy (argmax), as generate()'s greedy search;
- token: RAG-Token, a row per kept passage, each next token marginalized over them (greedy or
  a beam search);
- sequence: RAG-Sequence, a row per kept passage decoding its own hypothesis (greedy or a beam
  search each), marginalized when the last has ended.

A new mode is one module with a `Request` subclass, and one line in StepBatch.request.
"""
