"""Generation: the backend families, the decoding modes, and the step batch that runs them.

ARCHITECTURE.md maps its modules.
"""
