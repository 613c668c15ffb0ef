"""The seed's API::

    from circuit_discovery import CircuitDiscovery
    discovery = CircuitDiscovery(model_name=None, device="auto")   # None: the built-in Gemma 3 270M
    circuits = discovery.discover_all_circuits(dataset)
    for c in circuits:
        print(c.name, len(c.nodes), c.attribution_score)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.pipeline.config import RunConfig


class CircuitDiscovery:
    """Discover one circuit per relation of a fact dataset.

    ``model_name``: None (built-in ``gemma-3-270m``), a built-in or tiny model name, a local folder or a hub id.
    Other keyword arguments are :class:`~circuit_discovery.pipeline.RunConfig` fields (``max_facts``,
    ``known_k``, ``metric``, ``progress``, ``dictionaries`` -- load published transcoders instead of training them,
    a local folder/file or a cached Hugging Face repo id/path -- ``sae_kind`` ...).
    """

    def __init__(self, model_name: str | None = None, device: str = "auto", seed: int = 0,
                 cache_dir: str | None = None, **options: Any):
        self.cfg = RunConfig(model=model_name, device=device, seed=seed, cache_dir=cache_dir, **options)
        self._model = None
        self._dicts = None
        self.known_report = None  # the known-fact filter's report of the last discover_all_circuits call

    @property
    def model(self):
        if self._model is None:
            from circuit_discovery.models import load_model

            self._model = load_model(self.cfg.model, device=self.cfg.device, cache_dir=self.cfg.cache_dir,
                                     seed=self.cfg.seed)
        return self._model

    def transcoders(self):
        """The run's transcoders (:class:`~circuit_discovery.sae.dictionaries.DictionarySet`): loaded from
        ``dictionaries`` when it is set, else trained on the built-in corpus with this configuration's ``sae_*``
        options the first time, then loaded from the cache."""
        if self._dicts is None:
            from circuit_discovery.pipeline.feature_stage import dictionaries

            self._dicts = dictionaries(self.model, self.cfg)[0]
        return self._dicts

    def attribution_graph(self, prompt: str, *, max_feature_nodes: int | None = None, extra_logits=(), **kwargs):
        """The transcoder attribution graph of one prompt
        (:func:`~circuit_discovery.attribution.feature_graph.feature_graph`; trains or loads the transcoders first).
        Returns a :class:`~circuit_discovery.attribution.feature_graph.FeatureGraphResult` whose ``.graph`` exports with
        :func:`~circuit_discovery.graph.to_neuronpedia`."""
        from circuit_discovery.attribution.feature_graph import feature_graph

        return feature_graph(self.model, self.transcoders().transcoders, prompt,
                             max_feature_nodes=max_feature_nodes or self.cfg.feature_nodes,
                             extra_logits=extra_logits, batch_size=self.cfg.batch_size, **kwargs)

    def _dataset(self, dataset):
        from circuit_discovery.facts import Dataset, load_builtin, load_dataset

        if dataset is None:
            return load_builtin()
        if isinstance(dataset, Dataset):
            return dataset
        return load_dataset(dataset)

    def discover(self, facts: Sequence, relation: str | None = None, train_sae: bool = False):
        """One relation's circuit from its facts (a list of :class:`~circuit_discovery.facts.Fact`)."""
        from circuit_discovery.facts import Dataset

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
        ``.faithfulness``, ``.validation``): the circuits ``frc run`` writes to ``circuits.json`` for the same
        facts and options (the same per-relation functions, :func:`~circuit_discovery.pipeline.run.discover_relation`).

        ``train_sae=False``: component circuits -- EAP edge scores over heads, MLPs and embeddings, combined over
        the relation's facts by token role and pruned by influence. ``train_sae=True``: feature circuits --
        per-layer transcoders are trained on the built-in corpus (or reused from the cache; the first time takes
        about 10 minutes for Gemma 3 270M on 2 CPU cores), each fact's transcoder attribution graph is built with
        attention and norms frozen, and the graphs are combined by role and pruned; node ids are
        ``feature/L{layer}/I{feature}/{role}``, ``error/L{layer}/{role}`` and ``embed/L-1/{role}``; feature circuits
        are named ``<relation>/features``. ``validate`` fills ``.validation``
        (:class:`~circuit_discovery.graph.circuit.CircuitValidation`: in-sample and held-out faithfulness, held-out
        node share, CPR and matched random p) and ``.faithfulness``, the held-out faithfulness (``None`` without
        held-out facts, e.g. for the seed README's two facts: then ``.validation.faithfulness`` is the in-sample
        one).

        Each relation's known facts are split into discovery and held-out facts *before* pairing
        (:func:`~circuit_discovery.pipeline.attribution_stage.relation_pairs`): counterfactual subjects come from the
        same split only, only subject-swap pairs are used (a relation without any uses ROME-noise pairs
        for all its facts instead), and at most ``max_facts`` discovery and ``held_out_facts`` held-out pairs are
        kept. Relations are skipped for the reasons ``frc run`` skips them (no known fact, no discovery pair);
        the one difference is the noise fallback above, which ``frc run`` does not use. With ``quick`` and no
        ``relations``, the first ``quick_relations`` relations are used, as in ``frc run --quick``.

        ``dataset``: None (built-in facts), the seed's dict format, our rich format, a ROME list, a path, or a
        :class:`~circuit_discovery.facts.Dataset`.
        """
        from circuit_discovery.facts import load_builtin, select_relations
        from circuit_discovery.pipeline.attribution_stage import pairs_by_relation
        from circuit_discovery.pipeline.run import discover_relation, find_known, known_facts_by_relation

        if dataset is None and relations:
            ds = load_builtin(list(relations))  # named built-in relations, default selection or not
        else:
            ds = self._dataset(dataset)
            if relations:
                ds = select_relations(ds, relations)
            elif self.cfg.quick:
                ds = ds.select(ds.relation_names[: self.cfg.quick_relations])
        self.known_report = find_known(self.model, ds, self.cfg)
        facts = known_facts_by_relation(ds, self.known_report)
        # a relation without any subject-swap pair (e.g. the seed README's two facts) falls back to ROME-noise
        # pairs for all of its facts: one corruption type per relation, never mixed
        pairs, _ = pairs_by_relation(self.model, facts, self.cfg, noise_fallback=True)
        tcs = self.transcoders().transcoders if train_sae else None
        return [discover_relation(self.model, rel, p, self.cfg, transcoders=tcs, validate=validate)
                for rel, p in pairs.items()]
