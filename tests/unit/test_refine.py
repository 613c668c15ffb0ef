"""Greedy refinement of a circuit by exact ablation, and the exact-patching ranking.

Synthetic metrics give known answers (planted carriers, interactions that pruning must undo); a tiny model with a
planted carrier (every attention output and MLP zeroed except the last layer's attention) checks the whole path
through CircuitEvaluator."""
import math

import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.errors import InputError
from circuit_discovery.facts import Fact, build_pairs
from circuit_discovery.graph.refine import greedy_refine, refine_circuit
from circuit_discovery.validation.ablation import CircuitEvaluator
from circuit_discovery.validation.exact_ranking import exact_patching_ranking, node_effects

U = [f"n{i}" for i in range(30)]


def additive(weights):
    calls = []

    def metric_of(sets):
        calls.append(len(sets))
        return [sum(weights.get(n, 0.0) for n in s) for s in sets]
    metric_of.calls = calls
    return metric_of


def test_greedy_picks_planted_carrier_ranked_low():
    """The carrier carries 90% of m(N) but the base ranking puts it 10th: greedy takes it first; the top-1 of the
    ranking would give f = 0.01."""
    w = {n: 0.01 for n in U}
    w["n9"] = 0.9 - 0.01 * 29 + 0.01  # total m(N) = 0.9 + 0.29 ... exact value irrelevant, carrier dominates
    mf = sum(w.values())
    r = greedy_refine(additive(w), U, budget=1, universe=U, pool=10)
    assert r.nodes == ["n9"]
    assert r.faithfulness[-1] == pytest.approx(w["n9"] / mf)
    assert r.order[0] == "n9" and sorted(r.order) == sorted(U)
    # outside the pool the carrier cannot be seen: pool=5 picks a decoy (the pool is a real restriction)
    assert greedy_refine(additive(w), U, budget=1, universe=U, pool=5).nodes != ["n9"]


def test_budget_growth_evaluation_count_and_monotone_f():
    w = {n: float(i % 7) for i, n in enumerate(U)}
    f = additive(w)
    r = greedy_refine(f, U, budget=12, universe=U, pool=8, growth=0.5)
    assert len(r.nodes) == 12 == r.sizes[-1]
    assert all(b >= a - 1e-12 for a, b in zip(r.faithfulness, r.faithfulness[1:]))
    assert r.n_evaluations == sum(f.calls)
    # the base ranking's own top 12 carry less than greedy's 12 (greedy re-sorts inside the sliding pool)
    assert sum(w[n] for n in r.nodes) > sum(w[n] for n in U[:12])
    assert r.faithfulness[-1] == pytest.approx(sum(w[n] for n in r.nodes) / sum(w.values()))
    # sizes grow by max(1, floor(0.5 * picks)) per round
    assert r.sizes[:5] == [0, 1, 2, 3, 4]
    r2 = greedy_refine(additive(w), U, budget=12, universe=U, pool=8, growth=0.5, max_evaluations=30)
    assert r2.n_evaluations <= 30 and len(r2.nodes) < 12


def test_prune_removes_a_node_that_hurts_once_the_carrier_is_in():
    """x alone helps (+0.5) but cancels the carrier y (x and y: -1): forward greedy with pool 1 takes x then y
    (f = 0.5 of m(N)=1 ... with z); pruning removes x and the circuit reaches f(y)."""
    def metric_of(sets):
        out = []
        for s in sets:
            s = set(s)
            out.append(1.0 * ("y" in s) + 0.5 * ("x" in s) - 1.0 * ("x" in s and "y" in s) + 0.5 * ("z" in s))
        return out
    nodes = ["x", "y", "z", "q"]
    # m(N) = 1 + .5 - 1 + .5 = 1.0, m(∅) = 0
    r = greedy_refine(metric_of, nodes, budget=2, universe=nodes, pool=1)
    assert r.nodes == ["x", "y"] and r.faithfulness[-1] == pytest.approx(0.5)
    rp = greedy_refine(metric_of, nodes, budget=2, universe=nodes, pool=1, prune=True)
    assert "x" not in rp.nodes and "x" in rp.pruned and "y" in rp.nodes
    assert rp.faithfulness[-1] == pytest.approx(1.5)  # y + z
    assert rp.order[-1] == "x"


def test_distance_objective_does_not_prefer_overshoot():
    w = {"over": 1.3, "near": 0.95, "neg": -1.25}  # m(N) = 1.0
    assert greedy_refine(additive(w), list(w), budget=1, pool=3).nodes == ["over"]
    assert greedy_refine(additive(w), list(w), budget=1, pool=3, objective="distance").nodes == ["near"]
    with pytest.raises(InputError, match="objective"):
        greedy_refine(additive(w), list(w), budget=1, objective="cpr")


def test_forced_nodes_kept_and_errors():
    w = {n: 1.0 for n in U}
    r = greedy_refine(additive(w), U, budget=3, universe=U, forced=["emb"], pool=4)
    assert r.nodes[0] == "emb" and len(r.nodes) == 3 and r.forced == ["emb"]
    with pytest.raises(InputError, match="budget"):
        greedy_refine(additive(w), U, budget=0, universe=U)
    with pytest.raises(InputError, match="undefined"):
        greedy_refine(lambda sets: [0.0] * len(sets), U, budget=2, universe=U)
    with pytest.raises(InputError, match="pool"):
        greedy_refine(additive(w), U, budget=2, pool=0)


# ----------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def planted():
    """tiny-gemma3 in float64 with every attention output projection and every MLP down projection zeroed except
    head CARRIER of the last layer: the subject reaches the last position's logits only through that head at the
    last token (reading the subject embeddings)."""
    m = load_model("tiny-gemma3", device="cpu", dtype="float64")
    L, H = m.cfg.n_layers, m.cfg.n_heads
    with torch.no_grad():
        for name, p in m.hf_model.named_parameters():
            if "down_proj" in name or ("o_proj" in name and f"layers.{L - 1}." not in name):
                p.zero_()
            elif "o_proj" in name:  # [d_model, n_heads * head_dim]: keep only the carrier head's columns
                d = p.shape[1] // H
                keep = p[:, CARRIER * d:(CARRIER + 1) * d].clone()
                p.zero_()
                p[:, CARRIER * d:(CARRIER + 1) * d] = keep
    subjects = [("France", " Paris"), ("Germany", " Berlin"), ("Italy", " Rome"), ("Japan", " Tokyo"),
                ("Spain", " Madrid"), ("China", " Beijing")]
    facts = [Fact("capital", s, f"The capital of {s} is", a, template="The capital of {} is") for s, a in subjects]
    pairs = [p for p in build_pairs(facts, m.tokenizer) if p.corruption == "subject_swap" and p.first_token_differs]
    assert len(pairs) >= 3
    ev = CircuitEvaluator(m, pairs, metric="logit_diff", ablation="corrupted", granularity="head")
    return m, pairs, ev


CARRIER = 1


def test_refine_finds_the_planted_carrier_head(planted):
    m, pairs, ev = planted
    L = m.cfg.n_layers
    universe = list(ev.relevant_universe) if hasattr(ev, "relevant_universe") else ev.universe
    carrier = f"head/L{L - 1}/I{CARRIER}/last"
    subj = [u for u in universe if u.startswith("embed/") and "subject" in u]
    assert subj and carrier in universe
    # a base ranking that puts the carrier last in the pool, behind decoys whose outputs are zero
    decoys = [u for u in universe if u.startswith("head/L0/")][:10]
    ranked = decoys + [carrier] + [u for u in universe if u not in set(decoys + [carrier])]
    assert abs(ev.faithfulness(subj + decoys[:1])) < 1e-9  # the base ranking's top node carries nothing
    r = refine_circuit(ev, ranked, budget=len(subj) + 1, forced=subj, pool=len(decoys) + 1)
    assert r.nodes == subj + [carrier]
    assert r.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)  # the carrier is the whole mechanism
    assert r.faithfulness[0] == pytest.approx(0.0, abs=1e-9)  # embeddings alone: nothing reaches the logits
    # the same search without the carrier in its pool cannot find it (so the test above can fail)
    miss = refine_circuit(ev, ranked, budget=len(subj) + 1, forced=subj, pool=len(decoys))
    assert carrier not in miss.nodes and abs(miss.faithfulness[-1]) < 1e-9


def test_exact_patching_ranking_equals_leave_one_out_ablation(planted):
    m, pairs, ev = planted
    L = m.cfg.n_layers
    nodes = [f"head/L{L - 1}/I0/last", f"head/L{L - 1}/I1/last", "head/L0/I0/last", "embed/L-1/subject_last",
             f"mlp_out/L{L - 1}/last"]
    nodes = [n for n in nodes if n in ev.universe]
    eff = node_effects(m, pairs, nodes)
    full = list(ev.universe)
    per = ev.metric_per_prompt([full] + [[u for u in full if u != n] for n in nodes])
    expect = per[0][:, None] - per[1:].T  # [prompts, nodes]
    torch.testing.assert_close(eff, expect, atol=1e-8, rtol=1e-8)
    ranked, means = exact_patching_ranking(m, pairs, nodes)
    assert set(ranked) == set(nodes)
    assert abs(means["head/L0/I0/last"]) < 1e-12  # zeroed output: no effect
    assert ranked[-1] in ("head/L0/I0/last", f"mlp_out/L{L - 1}/last")
    assert all(math.isfinite(v) for v in means.values())
