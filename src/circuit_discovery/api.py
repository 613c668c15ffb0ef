"""The seed's API::

    from circuit_discovery import CircuitDiscovery
    discovery = CircuitDiscovery(model_name=None, device="auto")   # None: the built-in Gemma 3 270M
    circuits = discovery.discover_all_circuits(dataset)
    for c in circuits:
        print(c.name, len(c.nodes), c.attribution_score)
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .errors import CircuitDiscoveryError
from .pipeline.config import RunConfig

log = logging.getLogger(__name__)


class CircuitDiscovery:
    """Discover one circuit per relation of a fact dataset.

    ``model_name``: None (built-in ``gemma-3-270m``), a built-in or tiny model name, a local folder or a hub id.
    Other keyword arguments are :class:`~circuit_discovery.pipeline.RunConfig` fields (``max_facts``,
    ``top_nodes``, ``known_k``, ``metric``, ``seed``, ``progress`` ...).
    """

    def __init__(self, model_name: str | None = None, device: str = "auto", seed: int = 0,
                 cache_dir: str | None = None, **options: Any):
        self.cfg = RunConfig(model=model_name, device=device, seed=seed, cache_dir=cache_dir, **options)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from .models import load_model

            self._model = load_model(self.cfg.model, device=self.cfg.device, cache_dir=self.cfg.cache_dir,
                                     seed=self.cfg.seed)
        return self._model

    def _dataset(self, dataset):
        from .facts import Dataset, load_builtin, load_dataset

        if dataset is None:
            return load_builtin()
        if isinstance(dataset, Dataset):
            return dataset
        return load_dataset(dataset)

    def discover(self, facts: Sequence, relation: str | None = None):
        """One relation's circuit from its facts (a list of :class:`~circuit_discovery.facts.Fact`)."""
        from .facts import Dataset

        facts = list(facts)
        if not facts:
            raise CircuitDiscoveryError("no facts given; pass at least one fact of the relation")
        rel = relation or facts[0].relation
        circuits = self.discover_all_circuits(Dataset({rel: facts}))
        if not circuits:
            raise CircuitDiscoveryError(f"the model knows none of the {len(facts)} facts of {rel!r}")
        return circuits[0]

    def discover_all_circuits(self, dataset: Any = None, train_sae: bool = False,
                              relations: Sequence[str] | None = None, validate: bool = True):
        """Component circuits (``.name``, ``.nodes``, ``.edges``, ``.attribution_score``, ``.faithfulness``) for
        every relation with known facts: EAP edge scores over heads, MLPs and embeddings, combined over the
        relation's facts by token role and pruned by influence; ``validate`` fills ``.faithfulness``.

        ``dataset``: None (built-in facts), the seed's dict format, our rich format, a ROME list, a path, or a
        :class:`~circuit_discovery.facts.Dataset`.
        """
        if train_sae:
            raise NotImplementedError(
                "train_sae=True (feature circuits over sparse-autoencoder features) is not available yet; "
                "use train_sae=False for component circuits")
        from .facts import filter_known, select_relations
        from .graph import Circuit
        from .pipeline.attribution_stage import relation_pairs
        from .pipeline.circuit_stage import circuit_for_relation, validate_relation

        ds = self._dataset(dataset)
        if relations:
            ds = select_relations(ds, relations)
        known, report = filter_known(self.model, ds, k=self.cfg.known_k, batch_size=self.cfg.batch_size,
                                     progress=self.cfg.progress)
        self.known_report = report
        circuits = []
        for rel in ds.relation_names:
            facts = known[rel][: self.cfg.max_facts] if rel in known else []
            pairs = relation_pairs(self.model, facts, self.cfg) if facts else []
            if not pairs:
                log.warning("relation %s: no known fact with a usable counterfactual; skipped", rel)
                continue
            found = circuit_for_relation(self.model, rel, pairs, self.cfg)
            circuit = Circuit.from_dict(found["circuit"])
            if validate:
                v = validate_relation(self.model, pairs, found, self.cfg, self.cfg.seed)
                circuit.faithfulness = v["faithfulness"]
                circuit.extra["validation"] = {k: v[k] for k in ("node_share", "cpr", "cmd", "random_p",
                                                                 "held_out_faithfulness")}
            circuits.append(circuit)
        return circuits
