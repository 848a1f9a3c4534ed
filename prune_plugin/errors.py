"""Typed errors. Each subclasses the built-in a caller would catch for that kind of mistake."""

from __future__ import annotations


class PruningError(Exception):
    """Base class of every error raised by prune_plugin."""


class PolicyError(PruningError, ValueError):
    """A pruning policy (or a config entry holding one) is invalid."""


class TargetingError(PruningError, ValueError):
    """The policy's target patterns match no prunable module of the model."""


class AttachError(PruningError, RuntimeError):
    """The model cannot be attached to (already attached, or unsupported weights)."""


class StateError(PruningError, ValueError):
    """Saved pruning state does not fit the model or policy it is loaded into."""


class NumericalError(PruningError, FloatingPointError):
    """Training diverged: NaN or Inf in the scores or weights being pruned."""
