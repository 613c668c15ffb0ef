"""Negative controls: every check of the toolkit run where there is nothing to find.

    python benchmarks/validation_controls.py --out F.json [--seeds N] [--quick] [--alpha A] [--model NAME]
                                             [--workdir DIR] [--only a,b,c,d] [--threads T]

Controls (issue 14, "Show that every check can fail"):

* ``random_weights_*`` (a): the whole pipeline on a random-weights tiny model (``tiny-gemma3``, one model per
  seed), every fact forced through the known filter (``known_k=10**9``), features off. Counted per seed:
  hypothesis verdicts ``supported`` among the rows of ``hypotheses.csv`` that have a p-value
  (``random_weights_hypotheses``; per family in ``by_family``), circuits beating their matched random baseline
  (``metrics.json`` ``relations[r]["random_baseline_p"] < alpha``; ``random_weights_baselines``) and circuits
  marked ``validated`` (``random_weights_validated``).
* ``identical_prompts`` (b): the real model with pairs whose corrupted prompt *is* the clean prompt (no noise):
  nothing is removed, so every check must report the degenerate case. Checks: the evaluator's
  ``faithfulness_with_ci`` (degenerate), per-prompt faithfulness (all None), discovery (no non-embedding node with
  a nonzero score) and, where importable, the pipeline's ``circuit_validation`` (degenerate, no p-value) and
  ``is_validated`` (False). Deterministic: the bound is 0.
* ``random_circuits`` (c): a uniformly random circuit (every relevant embedding node, as pruning keeps them, plus
  ``frac`` of the other relevant nodes drawn uniformly) presented as the discovered one, judged by the evaluator's
  matched random baseline; counted: p < alpha. One random-weights tiny model per seed, ``--relations`` relations
  each. The baseline's p-value does not depend on the metric's scale, so the tiny models' small metric gaps are
  usable here; only relations whose gap is exactly zero (< 1e-6) are skipped (``degenerate``).
* ``permuted_relations`` (d): relation labels permuted across facts (pairs keep their true counterfactual
  partner), split-half circuits per pseudo-relation from per-prompt component graphs, then the hypotheses that
  compare relations: ``relation_specificity`` (within > between) must be supported at rate <= alpha.
  ``shared_mechanism`` rows are reported as well but are **not** a null under this control (pseudo-relations
  are mixtures of the same facts, so they share their mechanism by construction): ``informative: false``.

Bound: the 95% quantile of Binomial(tests, alpha) / tests (alpha plus a binomial margin); ``within_bound``:
``rate <= bound``. The binomial margin assumes independent tests; tests within one seed share a model and are
positively correlated, so read a borderline excess with that in mind.

Output: ``{"controls": {name: {"tests", "supported", "rate", "bound", "within_bound", ...}}, "power": {...},
"alpha", "seeds", "seconds": {...}, "all_within_bound"}``. ``power`` holds the same relation tests run with the
true labels (``true_relations_*``): there they should be supported, which shows the statistics can reject at all.
``all_within_bound`` ignores entries marked ``informative: false``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ALPHA = 0.05
DEFAULT_SEEDS = 20
TINY = "tiny-gemma3"


# ------------------------------------------------------------------------------------------------ bookkeeping
def binomial_bound(tests: int, alpha: float, q: float = 0.95) -> float:
    """The ``q`` quantile of Binomial(tests, alpha) divided by ``tests``: the largest rate of false positives a
    calibrated check shows in ``tests`` independent tests, ``q`` of the time (1.0 where there are no tests)."""
    from scipy.stats import binom

    if tests <= 0:
        return 1.0
    return float(binom.ppf(q, tests, alpha)) / tests


def summarize(tests: int, supported: int, alpha: float, *, bound: float | None = None, **extra: Any) -> dict:
    """One control's entry: ``{"tests", "supported", "rate", "bound", "within_bound", **extra}``."""
    tests, supported = int(tests), int(supported)
    rate = supported / tests if tests else 0.0
    b = binomial_bound(tests, alpha) if bound is None else float(bound)
    return {"tests": tests, "supported": supported, "rate": rate, "bound": b,
            "within_bound": bool(rate <= b + 1e-12), **extra}


def _finite(x: Any) -> bool:
    try:
        return x is not None and x != "" and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def count_run(out_dir: str | Path, alpha: float) -> dict:
    """What a pipeline run claims, from its ``hypotheses.csv`` and ``metrics.json``.

    Returns ``{"hypotheses": {"tests", "supported", "by_family": {id: [tests, supported]}}, "baselines": {"tests",
    "beaten", "degenerate"}, "validated": {"tests", "validated"}}``: a hypothesis row counts as a test when its
    p-value is finite; a circuit counts for the baseline when ``random_baseline_p`` is a number (``None``:
    degenerate metric gap, counted apart) and for ``validated`` when the field is present.
    """
    out = Path(out_dir)
    hyp = {"tests": 0, "supported": 0, "by_family": {}}
    path = out / "hypotheses.csv"
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if not _finite(row.get("p_value")):
                    continue
                fam = row.get("family") or row.get("hypothesis_id") or "?"
                if "relation_specificity" in (row.get("statistic") or "") and "specificity" not in fam:
                    fam += "/relation_specificity"  # its own test (a second pooled row of shared_mechanism)
                sup = row.get("verdict") == "supported"
                hyp["tests"] += 1
                hyp["supported"] += int(sup)
                t, s = hyp["by_family"].get(fam, [0, 0])
                hyp["by_family"][fam] = [t + 1, s + int(sup)]
    base = {"tests": 0, "beaten": 0, "degenerate": 0}
    val = {"tests": 0, "validated": 0}
    mpath = out / "metrics.json"
    if mpath.exists():
        rels = json.loads(mpath.read_text(encoding="utf-8")).get("relations", {})
        for r in rels.values():
            p = r.get("random_baseline_p")
            if _finite(p):
                base["tests"] += 1
                base["beaten"] += int(float(p) < alpha)
            else:
                base["degenerate"] += 1
            if "validated" in r:
                val["tests"] += 1
                val["validated"] += int(bool(r["validated"]))
    return {"hypotheses": hyp, "baselines": base, "validated": val}


# ------------------------------------------------------------------------------------------------ (a)
def control_random_weights(seeds: Sequence[int], *, alpha: float = DEFAULT_ALPHA, quick: bool = False,
                           workdir: str | Path | None = None, model: str = TINY,
                           run: Callable[..., Any] | None = None, **cfg_kwargs: Any) -> dict[str, dict]:
    """(a) The pipeline per seed on a random-weights model (seed = model weights), facts forced through the known
    filter. ``run(cfg)`` defaults to :func:`circuit_discovery.pipeline.run.run_pipeline` (tests inject a stub).
    Returns the entries ``random_weights_hypotheses``, ``random_weights_baselines``, ``random_weights_validated``."""
    from circuit_discovery.pipeline.config import RunConfig

    if run is None:
        from circuit_discovery.pipeline.run import run_pipeline as run
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="frc_controls_"))
    outs, seconds = [], []
    for s in seeds:
        out = work / f"random_weights_seed{s}"
        cfg = RunConfig(model=model, known_k=10 ** 9, features=False, seed=int(s), out=str(out), progress=False,
                        quick=quick, **cfg_kwargs)
        t0 = time.time()
        run(cfg)
        seconds.append(time.time() - t0)
        outs.append(out)
    return random_weights_from_runs(outs, alpha=alpha, seconds=seconds, model=model)


def random_weights_from_runs(out_dirs: Sequence[str | Path], *, alpha: float = DEFAULT_ALPHA,
                             seconds: Sequence[float] | None = None, model: str = TINY) -> dict[str, dict]:
    """The entries of control (a) from finished pipeline run folders (one per seed)."""
    hyp_t = hyp_s = base_t = base_b = base_d = val_t = val_v = 0
    fam: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for out in out_dirs:
        c = count_run(out, alpha)
        hyp_t += c["hypotheses"]["tests"]
        hyp_s += c["hypotheses"]["supported"]
        for f, (t, k) in c["hypotheses"]["by_family"].items():
            fam[f][0] += t
            fam[f][1] += k
        base_t += c["baselines"]["tests"]
        base_b += c["baselines"]["beaten"]
        base_d += c["baselines"]["degenerate"]
        val_t += c["validated"]["tests"]
        val_v += c["validated"]["validated"]
    n = len(out_dirs)
    by_family = {f: summarize(t, k, alpha) for f, (t, k) in sorted(fam.items())}
    per_family = {f"random_weights_hypotheses/{f}": {**v, "n_seeds": n, "model": model} for f, v in by_family.items()}
    timing = {}
    if seconds:
        timing = {"seconds_per_seed": [round(x, 1) for x in seconds],
                  "mean_seconds_per_seed": round(float(np.mean(seconds)), 1)}
    pooled = summarize(hyp_t, hyp_s, alpha, n_seeds=n, model=model, **timing)
    # a family far over its bound is not rescued by the many calibrated rows of the others
    pooled["within_bound"] = bool(pooled["within_bound"] and all(v["within_bound"] for v in by_family.values()))
    return {
        "random_weights_hypotheses": pooled,
        **per_family,
        "random_weights_baselines": summarize(base_t, base_b, alpha, degenerate=base_d, n_seeds=n, model=model),
        "random_weights_validated": summarize(val_t, val_v, alpha, n_seeds=n, model=model),
    }


# ------------------------------------------------------------------------------------------------ pairs
def relation_pairs(model, relations: Sequence[str] | None = None, n_relations: int = 4, max_pairs: int = 8,
                   seed: int = 0) -> dict[str, list]:
    """Subject-swap pairs (single-token answers that differ) of the built-in facts: ``{relation: pairs}`` for the
    first ``n_relations`` relations with at least 4 such pairs (or the named ones), at most ``max_pairs`` each."""
    from circuit_discovery.facts import build_pairs, load_builtin

    ds = load_builtin()
    names = list(relations) if relations else list(ds.keys())
    out: dict[str, list] = {}
    for r in names:
        pairs = [p for p in build_pairs(ds[r], model.tokenizer, seed=seed)
                 if p.corruption == "subject_swap" and p.first_token_differs]
        if len(pairs) >= 4 or relations:
            out[r] = pairs[:max_pairs]
        if not relations and len(out) >= n_relations:
            break
    return out


def identical_pair(p):
    """``p`` with its corrupted prompt replaced by the clean prompt (and no noise: ``subject_swap`` type)."""
    return replace(p, corrupted_prompt=p.clean_prompt, corrupted_tokens=p.clean_tokens,
                   corrupted_subject=p.subject, corruption="subject_swap")


# ------------------------------------------------------------------------------------------------ (b)
def control_identical_prompts(model, pairs_by_rel: Mapping[str, Sequence], *, seed: int = 0,
                              n_samples: int = 100) -> dict:
    """(b) Pairs whose corrupted prompt is the clean prompt: every check must say "degenerate". Counts the
    checks (``tests``) and those that reported anything else (``supported``; must be 0)."""
    from circuit_discovery.attribution.component_graph import component_circuit
    from circuit_discovery.validation.ablation import CircuitEvaluator

    try:
        from circuit_discovery.pipeline.circuit_stage import circuit_validation, is_validated
    except ImportError:  # pragma: no cover - older pipeline
        circuit_validation = is_validated = None
    from circuit_discovery.pipeline.config import RunConfig

    tests = bad = 0
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        nonlocal tests, bad
        tests += 1
        if not ok:
            bad += 1
            failures.append(what)

    for rel, pairs in pairs_by_rel.items():
        same = [identical_pair(p) for p in pairs]
        found = component_circuit(model, same, method="eap")
        ids = [n.id for n in found.circuit.nodes if not n.id.startswith("logit/")]
        claimed = [i for i in ids if not i.startswith("embed/")]
        scored = [nd.id for nd in found.combined.nodes if nd.kind != "logit" and abs(nd.score or 0.0) > 0]
        check(not claimed and not scored, f"{rel}: discovery claimed {claimed[:3]} / scored {scored[:3]}")
        ev = CircuitEvaluator(model, same)
        circuit = ids or ev.relevant_universe[:5] or ev.universe[:5]
        fci = ev.faithfulness_with_ci(circuit, seed=seed, n_boot=200)
        check(bool(fci["degenerate"]) and fci["faithfulness"] is None, f"{rel}: faithfulness_with_ci not degenerate")
        check(all(v is None for v in ev.faithfulness_per_prompt(circuit)), f"{rel}: per-prompt f not all None")
        if circuit_validation is not None:
            cfg = RunConfig(model=None, n_random=n_samples)
            v = circuit_validation(ev, circuit, circuit, cfg, seed)
            check(bool(v.get("degenerate")) and v.get("random_p") is None and v.get("faithfulness") is None,
                  f"{rel}: circuit_validation reported {v.get('faithfulness')}, p={v.get('random_p')}")
            check(not is_validated(v), f"{rel}: is_validated True")
    return summarize(tests, bad, 0.0, bound=0.0, failures=failures, relations=list(pairs_by_rel))


# ------------------------------------------------------------------------------------------------ (c)
def random_circuit(ev, rng: np.random.Generator, frac: float = 0.05, min_nodes: int = 2) -> list[str]:
    """Every relevant embedding node (pruning keeps them all) plus ``max(min_nodes, frac * n)`` of the other
    relevant nodes drawn uniformly."""
    rel = ev.relevant_universe
    emb = [u for u in rel if u.startswith("embed/")]
    rest = [u for u in rel if not u.startswith("embed/")]
    k = min(len(rest), max(int(min_nodes), int(round(frac * len(rest)))))
    pick = sorted(rng.choice(len(rest), size=k, replace=False).tolist())
    return emb + [rest[i] for i in pick]


def control_random_circuits(evaluators: Iterable[tuple[str, Any]], *, alpha: float = DEFAULT_ALPHA, seed: int = 0,
                            n_samples: int = 100, frac: float = 0.05, min_gap: float | None = None,
                            pick: Callable[..., list[str]] | None = None) -> dict:
    """(c) For each ``(label, evaluator)``: a uniformly random circuit judged by the evaluator's matched random
    baseline; counts p < alpha. Evaluators whose metric gap is below ``min_gap`` (default
    ``curves.DEFAULT_MIN_GAP``) are skipped and counted as ``degenerate``. ``pick(ev, rng, frac)`` replaces
    :func:`random_circuit` (a test passes a real selection to show the count then rises)."""
    from circuit_discovery.validation import curves

    gap_min = curves.DEFAULT_MIN_GAP if min_gap is None else float(min_gap)
    tests = beaten = degenerate = 0
    ps: list[float] = []
    for i, (label, ev) in enumerate(evaluators):
        mf, me = ev.references()
        if abs(mf - me) < gap_min:
            degenerate += 1
            continue
        rng = np.random.default_rng([seed, i])
        C = (pick or random_circuit)(ev, rng, frac)
        res = ev.matched_random_baseline(C, n_samples=n_samples, seed=seed + 7919 * (i + 1), m_full=mf, m_empty=me)
        tests += 1
        ps.append(float(res.p_value))
        beaten += int(res.p_value < alpha)
    return summarize(tests, beaten, alpha, degenerate=degenerate, n_samples=n_samples, frac=frac,
                     p_values=[round(p, 4) for p in ps])


def tiny_evaluators(seeds: Sequence[int], *, model: str = TINY, n_relations: int = 4, max_pairs: int = 8):
    """``(label, CircuitEvaluator)`` per seed (one random-weights model per seed) and relation, lazily."""
    from circuit_discovery import load_model
    from circuit_discovery.validation.ablation import CircuitEvaluator

    for s in seeds:
        m = load_model(model, device="cpu", seed=int(s))
        for rel, pairs in relation_pairs(m, n_relations=n_relations, max_pairs=max_pairs, seed=int(s)).items():
            yield f"{model}/seed{s}/{rel}", CircuitEvaluator(m, pairs)


# ------------------------------------------------------------------------------------------------ (d)
def permuted_halves(labels: Sequence[str], rng: np.random.Generator) -> dict[str, tuple[list[int], list[int]]]:
    """Relation labels permuted across facts, then each pseudo-relation's facts split in two random halves:
    ``{relation: (indices_a, indices_b)}`` (group sizes kept)."""
    order = rng.permutation(len(labels))
    return _true_halves([labels[i] for i in order], rng)


def _half_circuit(graphs, pairs, idx: Sequence[int], name: str, **prune: Any) -> list[str]:
    from circuit_discovery.graph.circuit import combine_graphs

    circ, _ = combine_graphs([graphs[i] for i in idx], [list(pairs[i].roles) for i in idx], name=name, **prune)
    return [n.id for n in circ.nodes if not n.id.startswith("logit/")]


def control_permuted_relations(model, pairs_by_rel: Mapping[str, Sequence], seeds: Sequence[int], *,
                               alpha: float = DEFAULT_ALPHA, n_draws: int = 199, shuffle: bool = True,
                               graphs: Sequence | None = None) -> dict[str, dict]:
    """(d) Per seed: relation labels permuted across the pooled facts (``shuffle=False``: true labels, for a
    power check), split-half circuits per pseudo-relation from per-prompt EAP graphs (computed once), then
    H2's ``shared_mechanism`` hypothesis (rows ``shared_mechanism`` and ``relation_specificity``). Returns the
    entries ``permuted_relations_specificity`` and ``permuted_relations_shared`` (informative: false)."""
    from circuit_discovery.attribution.component_graph import component_graphs
    from circuit_discovery.validation.ablation import CircuitEvaluator
    from circuit_discovery.validation.hypotheses import run_hypotheses

    pairs = [p for ps in pairs_by_rel.values() for p in ps]
    labels = [r for r, ps in pairs_by_rel.items() for _ in ps]
    if graphs is None:
        graphs = component_graphs(model, pairs, method="eap")
    counts = {"relation_specificity": [0, 0], "shared_mechanism": [0, 0]}
    effects: dict[str, list] = {k: [] for k in counts}
    for s in seeds:
        rng = np.random.default_rng(int(s))
        halves = permuted_halves(labels, rng) if shuffle else _true_halves(labels, rng)
        circuit_halves, universes = {}, {}
        for r, (a, b) in halves.items():
            if not a or not b:
                continue
            uni = CircuitEvaluator(model, [pairs[i] for i in a + b]).relevant_universe
            keep = set(uni)  # as the pipeline does: inert nodes (no attribution) cannot be in a half
            circuit_halves[r] = tuple([i for i in _half_circuit(graphs, pairs, h, f"{r}_{k}") if i in keep]
                                      for k, h in (("a", a), ("b", b)))
            universes[r] = uni
        df = run_hypotheses({"circuit_halves": circuit_halves, "relation_universe": universes,
                             "relation_specificity": True, "n_random_circuits": n_draws}, ids=["shared_mechanism"], alpha=alpha, seed=int(s))
        for _, row in df.iterrows():
            if not _finite(row["p_value"]):
                continue
            key = "relation_specificity" if "specificity" in str(row["statistic"]) else "shared_mechanism"
            counts[key][0] += 1
            counts[key][1] += int(row["verdict"] == "supported")
            effects[key].append(round(float(row["effect"]), 4) if _finite(row["effect"]) else None)
    tag = "permuted_relations" if shuffle else "true_relations"
    return {
        f"{tag}_specificity": summarize(*counts["relation_specificity"], alpha, n_seeds=len(seeds),
                                        relations=list(pairs_by_rel), effects=effects["relation_specificity"]),
        f"{tag}_shared": summarize(*counts["shared_mechanism"], alpha, n_seeds=len(seeds),
                                   effects=effects["shared_mechanism"], informative=not shuffle,
                                   note=None if not shuffle else
                                   "not a null for shared_mechanism: pseudo-relations mix the same facts, so they "
                                   "share their mechanism by construction"),
    }


def _true_halves(labels: Sequence[str], rng: np.random.Generator) -> dict[str, tuple[list[int], list[int]]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(labels):
        groups[r].append(i)
    out = {}
    for r, idx in groups.items():
        idx = [idx[j] for j in rng.permutation(len(idx))]
        h = len(idx) // 2
        out[r] = (sorted(idx[:h]), sorted(idx[h:]))
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=DEFAULT_SEEDS)
    ap.add_argument("--quick", action="store_true",
                    help="3 seeds, tiny model for every control (a smoke test, not evidence)")
    ap.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    ap.add_argument("--model", default=None, help="model of controls (b) and (d) (default: the built-in model)")
    ap.add_argument("--tiny-model", default=TINY, help="random-weights model of controls (a) and (c)")
    ap.add_argument("--workdir", default=None, help="folder for the pipeline runs of control (a) (default: temp)")
    ap.add_argument("--only", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    ap.add_argument("--collect", default=None, metavar="DIR",
                    help="control (a) from finished runs DIR/random_weights_seed* instead of running the pipeline")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--relations", type=int, default=4, help="relations used by controls (b), (c) and (d)")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per relation in controls (b), (c) and (d)")
    ap.add_argument("--n-random", type=int, default=100, help="random circuits per baseline in control (c)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from circuit_discovery import load_model
    from circuit_discovery.errors import CircuitDiscoveryError

    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    n_seeds = min(args.seeds, 3) if args.quick else args.seeds
    seeds = list(range(n_seeds))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    real_name = args.tiny_model if args.quick else args.model
    controls: dict[str, dict] = {}
    power: dict[str, dict] = {}  # the same statistics where there is something to find (expected: supported)
    seconds: dict[str, float] = {}
    try:
        if "a" in only and args.collect:
            outs = sorted(Path(args.collect).glob("random_weights_seed*"))
            outs = [o for o in outs if (o / "hypotheses.csv").exists()]
            controls.update(random_weights_from_runs(outs, alpha=args.alpha, model=args.tiny_model))
        elif "a" in only:
            t0 = time.time()
            controls.update(control_random_weights(seeds, alpha=args.alpha, quick=args.quick, workdir=args.workdir,
                                                   model=args.tiny_model))
            seconds["a"] = round(time.time() - t0, 1)
        if "c" in only:
            t0 = time.time()
            controls["random_circuits"] = control_random_circuits(
                tiny_evaluators(seeds, model=args.tiny_model, n_relations=args.relations, max_pairs=args.pairs),
                alpha=args.alpha, n_samples=args.n_random, min_gap=1e-6)
            controls["random_circuits"]["model"] = args.tiny_model
            seconds["c"] = round(time.time() - t0, 1)
        if only & {"b", "d"}:
            t0 = time.time()
            real = load_model(real_name, device="cpu")
            pairs = relation_pairs(real, n_relations=args.relations, max_pairs=args.pairs)
            seconds["load"] = round(time.time() - t0, 1)
            if "b" in only:
                t0 = time.time()
                controls["identical_prompts"] = control_identical_prompts(
                    real, {r: ps[:4] for r, ps in pairs.items()})
                controls["identical_prompts"]["model"] = real.cfg.model_name
                seconds["b"] = round(time.time() - t0, 1)
            if "d" in only:
                from circuit_discovery.attribution.component_graph import component_graphs

                t0 = time.time()
                flat = [p for ps in pairs.values() for p in ps]
                graphs = component_graphs(real, flat, method="eap")  # once: every permutation reuses them
                res = control_permuted_relations(real, pairs, seeds, alpha=args.alpha, graphs=graphs)
                # power: the same tests with the true labels must find the relations' own circuits
                pw = control_permuted_relations(real, pairs, seeds, alpha=args.alpha, graphs=graphs, shuffle=False)
                for v in (*res.values(), *pw.values()):
                    v["model"] = real.cfg.model_name
                controls.update(res)
                power.update(pw)
                seconds["d"] = round(time.time() - t0, 1)
    except CircuitDiscoveryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"controls": controls, "power": power, "alpha": args.alpha, "seeds": n_seeds,
              "quick": bool(args.quick), "seconds": seconds,
              "all_within_bound": all(v["within_bound"] for v in controls.values() if v.get("informative", True))}
    from circuit_discovery.io import atomic_write_json

    atomic_write_json(args.out, result)
    for k, v in [*controls.items(), *(("power:" + k, v) for k, v in power.items())]:
        flag = "" if v.get("informative", True) else " (informational)"
        print(f"{k:34s} tests={v['tests']:4d} supported={v['supported']:4d} rate={v['rate']:.3f} "
              f"bound={v['bound']:.3f} within={v['within_bound']}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
