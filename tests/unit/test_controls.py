"""The negative-control functions of benchmarks/validation_controls.py: bookkeeping, calibration under their null,
power against a planted effect, and the identical-prompt control on a tiny model (every check degenerate)."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuit_discovery.validation.ablation import EvaluatorMethods

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "validation_controls.py"
_spec = importlib.util.spec_from_file_location("validation_controls", _PATH)
V = importlib.util.module_from_spec(_spec)
sys.modules["validation_controls"] = V
_spec.loader.exec_module(V)


# ------------------------------------------------------------------------------------------------ bookkeeping
def test_binomial_bound_and_summary():
    assert V.binomial_bound(20, 0.05) == pytest.approx(3 / 20)  # P(Binom(20, .05) <= 3) >= .95 > P(<= 2)
    assert V.binomial_bound(0, 0.05) == 1.0
    assert V.binomial_bound(1000, 0.05) < 0.065
    s = V.summarize(20, 3, 0.05)
    assert s["rate"] == 0.15 and s["within_bound"]
    assert not V.summarize(20, 4, 0.05)["within_bound"]  # a check that supports 20% of null tests fails
    assert not V.summarize(10, 1, 0.0, bound=0.0)["within_bound"]
    # the bound holds a calibrated check about 95% of the time
    rng = np.random.default_rng(0)
    ok = [V.summarize(50, int((rng.random(50) < 0.05).sum()), 0.05)["within_bound"] for _ in range(400)]
    assert 0.9 <= np.mean(ok) <= 1.0


def _write_run(folder: Path, rows, relations):
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["hypothesis_id", "relation", "statistic", "effect", "ci_low", "ci_high", "p_value", "p_adjusted", "n",
            "verdict"]
    with open(folder / "hypotheses.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in rows:
            hid, p, verdict = row[:3]
            stat = row[3] if len(row) > 3 else "s"
            w.writerow([hid, "all", stat, 0.1, "", "", p, p, 5, verdict])
    (folder / "metrics.json").write_text(json.dumps({"relations": relations}))


def test_count_run_reads_verdicts_baselines_and_validated(tmp_path):
    _write_run(tmp_path, [("shared_mechanism", 0.001, "supported"),
                          ("shared_mechanism", 0.5, "inconclusive", "relation_specificity_within_minus_between"),
                          ("sparsity", "nan", "inconclusive"), ("sparsity", 0.01, "supported")],
               {"a": {"random_baseline_p": 0.0099, "validated": True},
                "b": {"random_baseline_p": 0.3, "validated": False},
                "c": {"random_baseline_p": None, "validated": False}})
    c = V.count_run(tmp_path, 0.05)
    assert c["hypotheses"]["tests"] == 3 and c["hypotheses"]["supported"] == 2  # NaN-p rows are no tests
    assert c["hypotheses"]["by_family"] == {"shared_mechanism": [1, 1], "shared_mechanism/relation_specificity": [1, 0],
                                            "sparsity": [1, 1]}
    assert c["baselines"] == {"tests": 2, "beaten": 1, "degenerate": 1}
    assert c["validated"] == {"tests": 3, "validated": 1}


def test_control_random_weights_aggregates_runs(tmp_path):
    """Control (a) with a stub pipeline: one run per seed, on that seed's model, known filter off; the counts add."""
    seen = []

    def run(cfg):
        seen.append((cfg.model, cfg.seed, cfg.known_k, cfg.features))
        sup = "supported" if cfg.seed == 0 else "inconclusive"
        _write_run(Path(cfg.out), [("early_site_mlp", 0.01, sup), ("sparsity", 0.7, "inconclusive")],
                   {"r": {"random_baseline_p": 0.02 if cfg.seed == 1 else 0.5, "validated": False}})

    out = V.control_random_weights([0, 1, 2], alpha=0.05, workdir=tmp_path, run=run)
    assert seen == [("tiny-gemma3", s, 10 ** 9, False) for s in range(3)]
    h = out["random_weights_hypotheses"]
    assert (h["tests"], h["supported"]) == (6, 1)
    assert out["random_weights_hypotheses/early_site_mlp"]["supported"] == 1
    assert (out["random_weights_baselines"]["tests"], out["random_weights_baselines"]["supported"]) == (3, 1)
    assert out["random_weights_validated"]["supported"] == 0
    assert len(h["seconds_per_seed"]) == 3


# ------------------------------------------------------------------------------------------------ (c) random circuits
class _AdditiveEvaluator(EvaluatorMethods):
    """A stand-in evaluator whose metric is additive: m(C) = sum of the kept nodes' weights (+ per-prompt noise).
    Node ids are real role-keyed ids, so the matched baseline's strata are those of the real evaluator."""

    def __init__(self, weights: dict[str, float], n_prompts: int = 4, seed: int = 0):
        self._universe = list(weights)
        self.w = torch.tensor([weights[u] for u in self._universe], dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        self.scale = 1 + 0.1 * torch.randn(n_prompts, generator=g, dtype=torch.float64)
        self.index = {u: i for i, u in enumerate(self._universe)}

    @property
    def universe(self):
        return list(self._universe)

    def metric_per_prompt(self, node_sets):
        rows = []
        for s in node_sets:
            idx = [self.index[i] for i in s if i in self.index]
            rows.append(self.w[idx].sum() * self.scale)
        return torch.stack(rows) if rows else torch.zeros(0, len(self.scale), dtype=torch.float64)

    def _components_only(self, nodes):
        return [n for n in nodes if not n.startswith("logit/")]


def _universe_ids():
    roles = ("subject_last", "relation", "last")
    ids = [f"embed/L-1/{r}" for r in roles]
    for l in range(4):
        for r in roles:
            ids += [f"head/L{l}/I{h}/{r}" for h in range(4)] + [f"mlp_out/L{l}/{r}"]
    return ids


def _evaluators(n, planted=False, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        ids = _universe_ids()
        w = {u: float(rng.gamma(2.0, 0.5)) for u in ids}
        if planted:  # one head per layer at "last" carries almost everything
            for l in range(4):
                w[f"head/L{l}/I{(i + l) % 4}/last"] = 25.0
        yield f"fake{i}", _AdditiveEvaluator(w, seed=i)


def _pick_heaviest(ev, rng, frac):
    """A "discovery" that knows the answer: embeddings + the heaviest non-embedding nodes."""
    rest = sorted((u for u in ev.universe if not u.startswith("embed/")), key=lambda u: -float(ev.w[ev.index[u]]))
    k = max(2, int(round(frac * len(rest))))
    return [u for u in ev.universe if u.startswith("embed/")] + rest[:k]


def test_random_circuits_control_is_calibrated_under_its_null():
    """Uniform random circuits against the matched baseline: the share with p < alpha stays within the bound."""
    res = V.control_random_circuits(_evaluators(150), alpha=0.05, n_samples=99, frac=0.08)
    assert res["tests"] == 150 and res["degenerate"] == 0
    assert res["within_bound"], res
    assert 0.0 < np.mean(res["p_values"]) and np.mean(res["p_values"]) > 0.35  # p roughly uniform, not piled at 0


def test_random_circuits_control_detects_a_real_selection():
    """Power: circuits that contain the planted heavy heads beat the matched baseline almost always, so the
    control's count rises far above the bound when the circuits are not random."""
    res = V.control_random_circuits(_evaluators(30, planted=True), alpha=0.05, n_samples=99, frac=0.08,
                                    pick=_pick_heaviest)
    assert res["rate"] >= 0.9 and not res["within_bound"], res


def test_random_circuit_keeps_embeddings_and_draws_the_rest():
    _, ev = next(_evaluators(1))
    C = V.random_circuit(ev, np.random.default_rng(0), frac=0.1)
    emb = [u for u in ev.universe if u.startswith("embed/")]
    assert C[:len(emb)] == emb and len(set(C)) == len(C)
    assert len(C) - len(emb) == round(0.1 * (len(ev.universe) - len(emb)))


# ------------------------------------------------------------------------------------------------ (d) permuted labels
def test_permuted_halves_keep_sizes_and_split_disjointly():
    labels = ["a"] * 6 + ["b"] * 5 + ["c"] * 4
    seen = set()
    for s in range(5):
        h = V.permuted_halves(labels, np.random.default_rng(s))
        assert {r: len(x) + len(y) for r, (x, y) in h.items()} == {"a": 6, "b": 5, "c": 4}
        idx = [i for x, y in h.values() for i in x + y]
        assert sorted(idx) == list(range(len(labels)))
        for x, y in h.values():
            assert abs(len(x) - len(y)) <= 1 and not set(x) & set(y)
        seen.add(tuple(sorted(h["a"][0] + h["a"][1])))
    assert len(seen) > 1  # the labels really move between facts


@pytest.fixture(scope="module")
def tiny():
    from circuit_discovery import load_model

    m = load_model("tiny-gemma3", device="cpu")
    return m, V.relation_pairs(m, n_relations=3, max_pairs=6)


def test_permuted_relations_control_runs_the_relation_tests(tiny):
    model, pairs = tiny
    out = V.control_permuted_relations(model, pairs, [0, 1], n_draws=49)
    spec, shared = out["permuted_relations_specificity"], out["permuted_relations_shared"]
    assert spec["tests"] == 2 and 0 <= spec["supported"] <= 2 and len(spec["effects"]) == 2
    assert shared["informative"] is False and "by construction" in shared["note"]


# ------------------------------------------------------------------------------------------------ (b) identical prompts
def test_identical_prompts_every_check_degenerate(tiny):
    model, pairs = tiny
    few = {r: ps[:3] for r, ps in list(pairs.items())[:2]}
    same = V.identical_pair(few[next(iter(few))][0])
    assert same.corrupted_tokens == same.clean_tokens and same.corruption == "subject_swap"
    res = V.control_identical_prompts(model, few, n_samples=19)
    assert res["tests"] >= 2 * 3 and res["supported"] == 0 and res["within_bound"], res["failures"]


def test_identical_prompts_control_can_fail(tiny, monkeypatch):
    """With the real corrupted prompts put back (a pair that does remove the subject), the same checks stop
    reporting "degenerate" and the control flags them."""
    model, pairs = tiny
    few = {r: ps[:3] for r, ps in list(pairs.items())[:1]}
    monkeypatch.setattr(V, "identical_pair", lambda p: p)
    from circuit_discovery.validation.ablation import CircuitEvaluator

    r, ps = next(iter(few.items()))
    mf, me = CircuitEvaluator(model, ps).references()
    if abs(mf - me) < 0.5:
        pytest.skip("this tiny model's gap is degenerate even with real corruption")
    res = V.control_identical_prompts(model, few, n_samples=19)
    assert res["supported"] > 0 and not res["within_bound"]


def test_cli_collects_finished_runs(tmp_path):
    """``--only a --collect DIR`` summarizes finished runs into the agreed JSON shape."""
    for s, verdict in ((0, "supported"), (1, "inconclusive")):
        _write_run(tmp_path / f"random_weights_seed{s}", [("sparsity", 0.01, verdict)],
                   {"r": {"random_baseline_p": 0.5, "validated": False}})
    out = tmp_path / "controls.json"
    assert V.main(["--out", str(out), "--only", "a", "--collect", str(tmp_path)]) == 0
    d = json.loads(out.read_text())
    assert d["alpha"] == 0.05
    h = d["controls"]["random_weights_hypotheses"]
    assert {k: h[k] for k in ("tests", "supported", "rate")} == {"tests": 2, "supported": 1, "rate": 0.5}
    assert h["bound"] == pytest.approx(V.binomial_bound(2, 0.05)) and h["within_bound"] == (h["rate"] <= h["bound"])
    assert d["all_within_bound"] == all(v["within_bound"] for v in d["controls"].values())


def test_one_family_over_its_bound_fails_the_pooled_entry(tmp_path):
    """Many calibrated rows must not hide one family that is "supported" in every seed."""
    outs = []
    for s in range(10):
        rows = [("late_attention_extraction", 0.5, "inconclusive")] * 30 + [("shared_mechanism", 0.001, "supported")]
        _write_run(tmp_path / f"random_weights_seed{s}", rows, {})
        outs.append(tmp_path / f"random_weights_seed{s}")
    out = V.random_weights_from_runs(outs)
    pooled = out["random_weights_hypotheses"]
    assert pooled["rate"] < pooled["bound"]  # 10 of 310 overall looks calibrated...
    assert not out["random_weights_hypotheses/shared_mechanism"]["within_bound"]
    assert not pooled["within_bound"]  # ...but the family is supported every time
