"""Tiny checkpoints written by tests in the exact upstream layout (file names, key names, dtypes)."""
