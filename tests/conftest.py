import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY = ("tiny-gpt2", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-llama")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with a reason where it is absent (a user's clone)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: ../shared is only present in the project's workspace and CI")
    return p


class _LazyModels(dict):
    """Tiny models built on first use (a test that needs one model does not pay for five)."""

    def __missing__(self, name):
        from circuit_discovery import load_model

        if name not in TINY:
            raise KeyError(name)
        self[name] = load_model(name, device="cpu")
        return self[name]


@pytest.fixture(scope="session")
def tiny_models():
    return _LazyModels()


@pytest.fixture(scope="session")
def real_model():
    """The built-in Gemma 3 270M (cached after the first load)."""
    from circuit_discovery import load_model

    return load_model(device="cpu")
