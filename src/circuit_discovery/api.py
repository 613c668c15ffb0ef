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

    def transcoders(self):
        """The per-layer transcoders (:class:`~circuit_discovery.sae.dictionaries.DictionarySet`): trained on the
        built-in corpus with this configuration's ``sae_*`` options the first time, then loaded from the cache."""
        if getattr(self, "_dicts", None) is None:
            from .pipeline.feature_stage import dictionaries

            self._dicts = dictionaries(self.model, self.cfg)[0]
        return self._dicts

    def attribution_graph(self, prompt: str, *, max_feature_nodes: int | None = None, extra_logits=(), **kwargs):
        """The transcoder attribution graph of one prompt
        (:func:`~circuit_discovery.graph.features.feature_graph`; trains or loads the transcoders first).
        Returns a :class:`~circuit_discovery.graph.features.FeatureGraphResult` whose ``.graph`` exports with
        :func:`~circuit_discovery.graph.to_neuronpedia`."""
        from .graph.features import feature_graph

        return feature_graph(self.model, self.transcoders().transcoders, prompt,
                             max_feature_nodes=max_feature_nodes or self.cfg.feature_nodes,
                             extra_logits=extra_logits, batch_size=self.cfg.batch_size, **kwargs)

    def _dataset(self, dataset):
        from .facts import Dataset, load_builtin, load_dataset

        if dataset is None:
            return load_builtin()
        if isinstance(dataset, Dataset):
            return dataset
        return load_dataset(dataset)

    def discover(self, facts: Sequence, relation: str | None = None, train_sae: bool = False):
        """One relation's circuit from its facts (a list of :class:`~circuit_discovery.facts.Fact`)."""
        from .facts import Dataset

        facts = list(facts)
        if not facts:
            raise CircuitDiscoveryError("no facts given; pass at least one fact of the relation")
        rel = relation or facts[0].relation
        circuits = self.discover_all_circuits(Dataset({rel: facts}), train_sae=train_sae)
        if not circuits:
            raise CircuitDiscoveryError(f"the model knows none of the {len(facts)} facts of {rel!r}")
        return circuits[0]

    def discover_all_circuits(self, dataset: Any = None, train_sae: bool = False,
                              relations: Sequence[str] | None = None, validate: bool = True):
        """One circuit per relation with known facts (``.name``, ``.nodes``, ``.edges``, ``.attribution_score``,
        ``.faithfulness``).

        ``train_sae=False``: component circuits -- EAP edge scores over heads, MLPs and embeddings, combined over
        the relation's facts by token role and pruned by influence. ``train_sae=True``: feature circuits --
        per-layer transcoders are trained on the built-in corpus (or reused from the cache; the first time takes
        about 10 minutes for Gemma 3 270M on 2 CPU cores), each fact's transcoder attribution graph is built with
        attention and norms frozen, and the graphs are combined by role and pruned; node ids are
        ``feature/L{layer}/I{feature}/{role}``, ``error/L{layer}/{role}`` and ``embed/L-1/{role}``. ``validate``
        fills ``.faithfulness`` (and ``.extra["validation"]``).

        Each relation's known facts are split into discovery and held-out facts *before* pairing
        (:func:`~circuit_discovery.pipeline.attribution_stage.relation_pairs`): counterfactual subjects come from the
        same split only, only subject-swap pairs are used (a relation without any uses ROME-noise pairs
        for all its facts instead), and at most ``max_facts`` discovery and ``held_out_facts`` held-out pairs are
        kept.

        ``dataset``: None (built-in facts), the seed's dict format, our rich format, a ROME list, a path, or a
        :class:`~circuit_discovery.facts.Dataset`.
        """
        from .facts import filter_known, load_builtin, select_relations
        from .graph import Circuit
        from .pipeline.attribution_stage import relation_pairs
        from .pipeline.circuit_stage import circuit_for_relation, validate_relation

        if dataset is None and relations:
            ds = load_builtin(list(relations))  # named built-in relations, default selection or not
        else:
            ds = self._dataset(dataset)
            if relations:
                ds = select_relations(ds, relations)
        known, report = filter_known(self.model, ds, k=self.cfg.known_k, batch_size=self.cfg.batch_size,
                                     progress=self.cfg.progress)
        self.known_report = report
        circuits = []
        tcs = self.transcoders().transcoders if train_sae else None
        for rel in ds.relation_names:
            # every known fact of the relation: relation_pairs splits them into discovery and held-out facts
            # first and draws counterfactual partners inside each split only (then caps each split)
            facts = list(known[rel]) if rel in known else []
            # a relation without any subject-swap pair (e.g. the seed README's two facts) falls back to ROME-noise
            # pairs for all of its facts: one corruption type per relation, never mixed
            pairs = relation_pairs(self.model, facts, self.cfg, noise_fallback=True)
            if not pairs["discovery"]:
                log.warning("relation %s: no known discovery fact with a usable subject-swap partner; skipped", rel)
                continue
            if not pairs["held_out"]:
                log.warning("relation %s: no held-out subject-swap pair; held-out validation is skipped", rel)
            if train_sae:
                from .pipeline.feature_stage import feature_circuit_for_relation

                found = feature_circuit_for_relation(self.model, tcs, rel, pairs, self.cfg, self.cfg.seed,
                                                     validate=validate)
                circuit = Circuit.from_dict(found["circuit"])
                if validate:
                    v = found["validation"]
                    circuit.faithfulness, circuit.extra["validation"] = _headline(v, v.get("held_out"), extra=(
                        "feature_ablation_drop", "steering_flips", "faithfulness_live", "held_out_faithfulness_live"))
                circuits.append(circuit)
                continue
            found = circuit_for_relation(self.model, rel, pairs, self.cfg)
            circuit = Circuit.from_dict(found["circuit"])
            if validate:
                v = validate_relation(self.model, pairs, found, self.cfg, self.cfg.seed)
                circuit.faithfulness, circuit.extra["validation"] = _headline(v.get("in_sample", v), v.get("held_out"),
                                                                              extra=("validated",), top=v)
            circuits.append(circuit)
        return circuits


def _headline(in_sample: dict, held_out: dict | None, extra=(), top: dict | None = None) -> tuple:
    """``(faithfulness, validation dict)`` of one circuit: the held-out numbers where held-out facts exist (the
    headline), else the in-sample ones, labelled by ``split``."""
    head = held_out if held_out else in_sample
    top = top if top is not None else in_sample
    out = {"split": "held_out" if held_out else "in_sample",
           "faithfulness_ci": head.get("ci"), "degenerate": head.get("degenerate"),
           **{k: head.get(k) for k in ("node_share", "cpr", "cmd", "random_p", "faithfulness_at")},
           "held_out_faithfulness": held_out.get("faithfulness") if held_out else None,
           "in_sample_faithfulness": in_sample.get("faithfulness"),
           "n_discovery": top.get("n_discovery"), "n_held_out": top.get("n_held_out", 0)}
    out.update({k: (top.get(k) if k in top else in_sample.get(k)) for k in extra})
    return head.get("faithfulness"), out
