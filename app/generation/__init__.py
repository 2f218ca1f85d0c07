"""Generator backends (encoder-decoder, decoder-only) and RAG decoding."""
