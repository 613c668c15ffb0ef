"""Models: loading (built-in offline GGUF, hub ids, local folders, tiny random configs) and ``HookedModel``."""
from circuit_discovery.models.arch import ARCHITECTURES, ArchSpec
from circuit_discovery.models.cache import ModelCacheError
from circuit_discovery.models.hooked import HookedModel, ModelConfig, frozen
from circuit_discovery.models.loading import (
           BUILTIN_MODELS,
           DEFAULT_MODEL,
           TINY_MODELS,
           available_models,
           builtin_folder,
           cache_root,
           load_model,
           resolve_device,
           verify_model_cache,
)
from circuit_discovery.models.synthetic import build_shaped

__all__ = ["ARCHITECTURES", "ArchSpec", "HookedModel", "ModelConfig", "BUILTIN_MODELS", "DEFAULT_MODEL",
           "TINY_MODELS", "available_models", "builtin_folder", "cache_root", "frozen", "load_model",
           "resolve_device", "verify_model_cache", "ModelCacheError", "build_shaped"]
