"""Exceptions that the CLI turns into a clear one-paragraph message instead of a traceback."""

from __future__ import annotations


class DidaError(Exception):
    """Base class of every user-facing error: the message says which file, what is wrong, what to do."""


class ConfigError(DidaError):
    """A configuration that cannot be used (unknown key, wrong type, out-of-range value)."""


class CheckpointError(DidaError):
    """A checkpoint that cannot be loaded (unsafe, truncated, wrong layout, shape or class count)."""


class DataError(DidaError):
    """A dataset problem: missing root or split, unreadable file, label without image, bad ids."""
