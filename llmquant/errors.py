"""User-facing errors: one line naming the problem and the fix; the CLI prints them, exit 2."""
from __future__ import annotations


class LLMQuantError(Exception):
    """An error caused by the user's input. ``str(err)`` is a one-line message with the fix."""

    exit_code = 2


class InputError(LLMQuantError):
    """Bad command-line input, model, data or config."""


class CheckpointError(LLMQuantError):
    """A checkpoint on disk is missing, truncated, corrupted or inconsistent."""


class NumericalError(LLMQuantError):
    """NaN/Inf or another numerical failure that the user must act on."""
