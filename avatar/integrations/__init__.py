"""Adapters that plug a live session (Converse) into other frameworks; each one needs its extra."""
