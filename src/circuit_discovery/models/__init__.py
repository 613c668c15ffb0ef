"""Models: loading (built-in offline GGUF, hub ids, local folders, tiny random configs) and ``HookedModel``."""
from .arch import ARCHITECTURES, ArchSpec
from .hooked import HookedModel, ModelConfig
from .loading import (BUILTIN_MODELS, DEFAULT_MODEL, TINY_MODELS, available_models, builtin_folder, cache_root,
                      load_model, resolve_device)

__all__ = ["ARCHITECTURES", "ArchSpec", "HookedModel", "ModelConfig", "BUILTIN_MODELS", "DEFAULT_MODEL",
           "TINY_MODELS", "available_models", "builtin_folder", "cache_root", "load_model", "resolve_device"]
