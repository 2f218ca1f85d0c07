"""Generation: the backend families (encoder-decoder, decoder-only), the decoding modes and the step batch that runs them all (ARCHITECTURE.md)."""
