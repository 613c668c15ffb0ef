"""factual-recall-circuits: find and test the circuits with which transformer LMs recall facts."""
from __future__ import annotations

__version__ = "0.1.0"

from circuit_discovery.errors import (
    CircuitDiscoveryError,
    DeviceError,
    HookError,
    InputError,
    ModelLoadError,
    ModelNotAvailableError,
)
from circuit_discovery.models import HookedModel, load_model


def __getattr__(name: str):  # lazy: the seed API pulls in the whole pipeline
    if name in ("CircuitDiscovery",):
        from circuit_discovery.api import CircuitDiscovery

        return CircuitDiscovery
    raise AttributeError(name)


__all__ = ["CircuitDiscovery", "HookedModel", "load_model", "CircuitDiscoveryError", "DeviceError", "HookError",
           "InputError", "ModelLoadError", "ModelNotAvailableError", "__version__"]
