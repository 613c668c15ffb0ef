"""The run's transcoders as one object (:class:`DictionarySet`), shared by per-layer training
(:mod:`circuit_discovery.sae.dictionaries`) and cross-layer training (:mod:`circuit_discovery.sae.clt_training`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from circuit_discovery.sae.architectures import SparseAutoencoder
from circuit_discovery.sae.transcoder_set import TranscoderSet

__all__ = ["DictionarySet"]


@dataclass
class DictionarySet:
    """Transcoders by layer, with provenance and (optionally) held-out metrics by layer."""

    transcoders: dict[int, SparseAutoencoder]
    corpus_id: str
    trained: list[int] = field(default_factory=list)  # layers trained in this call (others came from the cache)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "topk_transcoder"
    #: what feature graphs take: ``per_layer`` = :attr:`transcoders`, or ``cross_layer`` for ``kind="clt"``
    transcoder_set: TranscoderSet | None = None

    def __post_init__(self) -> None:
        if self.transcoder_set is None:
            self.transcoder_set = TranscoderSet(per_layer=dict(self.transcoders), source=f"trained ({self.kind})",
                                                metadata={"kind": self.kind, "corpus_id": self.corpus_id})

    def metrics_json(self) -> dict[str, Any]:
        return {"corpus_id": self.corpus_id, "kind": self.kind, "settings": self.settings,
                "trained_layers": self.trained, "seconds": self.seconds,
                "layers": {f"blocks.{l}.mlp.hook_in->blocks.{l}.hook_mlp_out": m
                           for l, m in sorted(self.metrics.items())}}
