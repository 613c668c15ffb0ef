"""Typed exceptions. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class CircuitDiscoveryError(Exception):
    """Base class of every error this toolkit raises on bad input or environment."""


class ModelLoadError(CircuitDiscoveryError, ValueError):
    """A model name, folder or hub id could not be loaded."""


class ModelNotAvailableError(ModelLoadError):
    """A hub model was asked for but cannot be reached (offline) and is not cached."""


class DeviceError(CircuitDiscoveryError, ValueError):
    """The requested device does not exist here."""


class HookError(CircuitDiscoveryError, KeyError):
    """An unknown hook name, or an intervention that does not fit the activation."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InputError(CircuitDiscoveryError, ValueError):
    """Prompts or tensors that the model cannot take (too long, empty, wrong shape)."""


class GraphError(CircuitDiscoveryError, ValueError):
    """An attribution graph (or an operation on it) is malformed."""
