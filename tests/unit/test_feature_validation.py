"""Feature-circuit validation: live (real-model) vs frozen (replacement-model) error nodes, circuit-tracer's
replacement/completeness scores, the graph's and the evaluator's error nodes, inert nodes, the curve normaliser
and the per-prompt ``features_matter`` data.

An *exact* transcoder is made by replacing each MLP of a tiny Llama with its transcoder (``mlp(x) = tc(x)``), so
the reconstruction error is zero for every input.
"""
from collections import Counter

import numpy as np
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution.feature_graph import feature_graph, graph_scores
from circuit_discovery.errors import InputError
from circuit_discovery.sae import SAEConfig, create_sae
from circuit_discovery.validation.features import FeatureCircuitEvaluator

PROMPT = "The Eiffel Tower is in the city of"


def _transcoders(model):
    out = {}
    for l in range(model.cfg.n_layers):
        tc = create_sae(SAEConfig(d_in=model.cfg.d_model, architecture="topk", k=4, transcoder=True), seed=l)
        with torch.no_grad():
            tc.W_enc.mul_(10.0)
            tc.b_enc.add_(0.01)
            tc.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(l))
        out[l] = tc.eval()
    return out


def _make_exact(model, tcs):
    """Replace every MLP by its transcoder: the transcoders become exact (zero error)."""
    for l, layer in enumerate(model._layers):
        layer.mlp.forward = (lambda x, tc=tcs[l]: tc.decode(tc.encode(x)))
    return model


def _pairs(model, n=3, relation="capital_city"):
    from circuit_discovery.facts import build_pairs, load_builtin

    pairs = [p for p in build_pairs(load_builtin()[relation], model.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    length = Counter(len(p.clean_tokens) for p in pairs).most_common(1)[0][0]
    return [p for p in pairs if len(p.clean_tokens) == length][:n]


@pytest.fixture(scope="module")
def noisy():
    m = load_model("tiny-llama", device="cpu")
    return m, _transcoders(m), _pairs(m)


@pytest.fixture(scope="module")
def exact():
    m = load_model("tiny-llama", device="cpu")
    tcs = _transcoders(m)
    return _make_exact(m, tcs), tcs, _pairs(m)


def _random_sets(universe, n, seed=0):
    rng = np.random.default_rng(seed)
    return [[u for u in universe if rng.random() < frac] for frac in np.linspace(0.1, 0.9, n)]


# ------------------------------------------------------------------------------------------ live vs frozen
def test_live_equals_frozen_with_an_exact_transcoder(exact):
    m, tcs, pairs = exact
    fr = FeatureCircuitEvaluator(m, tcs, pairs, errors="frozen")
    lv = fr.with_errors("live")
    sets = _random_sets(fr.universe, 6) + [fr.universe, []]
    a, b = fr.metric_per_prompt(sets), lv.metric_per_prompt(sets)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert float((a[0] - a[-1]).abs().max()) > 1e-3  # the sets do something


def test_live_errors_follow_the_circuit_frozen_errors_do_not(noisy):
    """Keep every feature and error node and ablate only the embeddings that differ between the clean and the
    corrupted prompt: live errors reproduce the real model's corrupted run (f = 0), frozen (clean) errors inject
    the clean run's information (f far from 0)."""
    m, tcs, pairs = noisy
    fr = FeatureCircuitEvaluator(m, tcs, pairs, errors="frozen")
    lv = FeatureCircuitEvaluator(m, tcs, pairs, errors="live")
    moving_emb = [i for i in fr.relevant_universe if i.startswith("embed/")]
    assert moving_emb and all(i.split("/")[-1].startswith("subject") for i in moving_emb)
    keep = [i for i in fr.universe if i not in moving_emb]
    for ev in (fr, lv):  # references are the real model's clean and corrupted runs in both modes
        assert ev.faithfulness(ev.universe) == pytest.approx(1.0, abs=1e-9)
        assert ev.faithfulness([]) == pytest.approx(0.0, abs=1e-9)
    assert lv.faithfulness(keep) == pytest.approx(0.0, abs=1e-4)
    assert abs(fr.faithfulness(keep)) > 0.05
    with pytest.raises(InputError, match="errors must be"):
        FeatureCircuitEvaluator(m, tcs, pairs, errors="sometimes")


# ------------------------------------------------------------------------------------------ graph scores
def test_replacement_and_completeness_scores(exact, noisy):
    m, tcs, _ = exact
    s = feature_graph(m, tcs, PROMPT, max_feature_nodes=10_000, include_bos=True).scores()
    assert s["replacement_score"] == pytest.approx(1.0, abs=1e-9)
    assert s["completeness_score"] == pytest.approx(1.0, abs=1e-9)
    assert s["error_influence_share"] == pytest.approx(0.0, abs=1e-9)
    capped = feature_graph(m, tcs, PROMPT, max_feature_nodes=5, include_bos=True).scores()
    assert capped["replacement_score"] < 1.0 - 1e-3  # unvisited features are folded into the error nodes
    mn, tn, _ = noisy
    r = feature_graph(mn, tn, PROMPT, max_feature_nodes=10_000, include_bos=True)
    sn = graph_scores(r.graph)
    assert 0.0 < sn["replacement_score"] < 0.99
    assert 0.0 < sn["completeness_score"] < 0.99
    assert 0.01 < sn["error_influence_share"] < 1.0


def test_graph_scores_follow_circuit_tracer_definition():
    """Hand-built graph: token t -> feature f -> logit, token t -> error e -> logit (weights 3 and 1)."""
    from circuit_discovery.graph.graph import AttributionGraph, NodeInfo
    from circuit_discovery.nodes import Node

    nodes = [NodeInfo(node=Node("feature", 0, 1, 0)), NodeInfo(node=Node("error", 0, 1)),
             NodeInfo(node=Node("embed", -1, 1)), NodeInfo(node=Node("logit", 1, 1, 5))]
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[0, 2] = 2.0  # feature <- token
    A[3, 0], A[3, 1] = 3.0, 1.0  # logit <- feature, error
    g = AttributionGraph(nodes=nodes, adjacency=A, logit_indices=[3], logit_probabilities=torch.ones(1),
                         prompt="x", prompt_tokens=["a", "b"], prompt_token_ids=[0, 1], n_layers=1)
    s = graph_scores(g)
    # influence: feature 0.75, error 0.25, token 0.75 (through the feature); the error node has no token input
    assert s["replacement_score"] == pytest.approx(0.75 / (0.75 + 0.25))
    # completeness: logit row has 0.25 error input; weights: logit 1, feature 0.75, error 0.25, token 0.75
    assert s["completeness_score"] == pytest.approx((1 * 0.75 + 0.75 + 0.25 + 0.75) / (1 + 0.75 + 0.25 + 0.75))
    assert s["error_influence_share"] == pytest.approx(0.25 / 1.75)


# ------------------------------------------------------------------------------------------ error node agreement
def test_graph_and_evaluator_error_nodes_are_the_same_vectors(noisy):
    m, tcs, pairs = noisy
    pairs = pairs[:2]
    res = [feature_graph(m, tcs, list(p.clean_tokens), max_feature_nodes=6, roles=list(p.roles)) for p in pairs]
    assert all(r.n_visited < r.n_active_features for r in res)  # the cap folds features into the error nodes
    ev = FeatureCircuitEvaluator.from_graphs(m, tcs, pairs, res, ablation="zero")
    for i, r in enumerate(res):
        e = ev.error_vectors(i)
        assert torch.allclose(e, r.errors, atol=1e-5 * float(r.errors.abs().max()))
        # the graph's error node activation is the norm of that vector
        for nd in r.graph.nodes:
            if nd.node.component == "error":
                assert nd.activation == pytest.approx(float(e[nd.node.layer, nd.node.position].norm()), rel=1e-4)
    # end to end: ablating error/L{last}/last (zero ablation) = the real model with the graph's error vector
    # removed from the last layer's MLP output at the last position
    L = m.cfg.n_layers
    mc = ev.metric_per_prompt([[i for i in ev.universe if i != f"error/L{L - 1}/last"]])[0]
    from circuit_discovery.metrics import batch_from_pairs, get_metric

    b = batch_from_pairs(m, pairs)
    errs = torch.stack([r.errors[L - 1] for r in res])  # [b, n, d]
    last = torch.tensor([[role == "last" for role in p.roles] for p in pairs])

    def hook(x, _):
        return x - errs.to(x.dtype) * last[..., None]

    with torch.no_grad(), m.hooks([(f"blocks.{L - 1}.hook_mlp_out", hook)]):
        manual = get_metric("logit_diff")(m, m.final_hidden(b.tokens, b.mask), b).double()
    assert torch.allclose(mc, manual, atol=1e-4)
    # the default evaluator (every active feature a node) means a different vector when features were capped
    ev_all = FeatureCircuitEvaluator(m, tcs, pairs, ablation="zero")
    assert not torch.allclose(ev_all.error_vectors(0), res[0].errors, atol=1e-4)


def test_feature_nodes_arguments(noisy):
    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs)
    feats = [i for i in ev.universe if i.startswith("feature/")][:5]
    sub = FeatureCircuitEvaluator(m, tcs, pairs, feature_nodes=feats)
    assert [i for i in sub.universe if i.startswith("feature/")] == [i for i in feats if i in sub.universe]
    assert sub.faithfulness(sub.universe) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(InputError):
        FeatureCircuitEvaluator(m, tcs, pairs, feature_nodes=[[(0, 1, 2)]])  # one entry for 3 pairs
    with pytest.raises(InputError):
        FeatureCircuitEvaluator(m, tcs, pairs, feature_nodes=["error/L0/last"])


# ------------------------------------------------------------------------------------------ inert nodes, curve
def test_inert_nodes_are_no_ops(noisy):
    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs)
    inert = set(ev.inert_nodes())
    assert {"embed/L-1/bos", "error/L0/bos"} <= inert
    assert all(i.startswith(("embed/", "error/", "feature/")) for i in inert)
    assert not any(i.split("/")[-1].startswith("subject") and i.startswith("embed/") for i in inert)
    rel = ev.relevant_universe
    assert len(rel) == len(ev.universe) - len(inert) and not inert & set(rel)
    per = ev.metric_per_prompt([ev.universe, rel])
    assert torch.allclose(per[0], per[1], atol=1e-5)  # ablating every inert node changes nothing
    zero = FeatureCircuitEvaluator(m, tcs, pairs, ablation="zero")
    assert "embed/L-1/bos" not in zero.inert_nodes()  # zero != the BOS embedding


def test_curve_ranks_over_the_whole_universe_and_normalises_by_m_of_n(noisy):
    """Old code: ``ev.curve(ranked)`` with a ranked *subset* normalised by m(ranked subset) and put its x-axis
    over the subset; now the curve spans the relevant universe (ranked first) with m(N), m(∅) as references."""
    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs)
    mf, me = ev.references()
    rel = ev.relevant_universe
    ranked = [i for i in rel if i.startswith("feature/")][:7]  # a small ranked subset (like a graph's nodes)
    assert ev.metric_of([ranked])[0] != pytest.approx(mf, abs=1e-3)
    c = ev.curve(ranked)
    assert c.n_nodes == len(rel)
    assert c.m_full == pytest.approx(mf) and c.m_empty == pytest.approx(me)
    assert c.faithfulness[-1] == pytest.approx(1.0)
    order = ranked + [i for i in rel if i not in ranked]
    s = int(c.sizes[-3])
    expect = (ev.metric_of([order[:s]])[0] - me) / (mf - me)
    assert c.faithfulness[-3] == pytest.approx(expect, abs=1e-9)
    full = ev.curve(ranked, relevant_only=False)
    assert full.n_nodes == len(ev.universe)


def test_baseline_node_sets(exact, noisy):
    m, tcs, pairs = exact
    ev = FeatureCircuitEvaluator(m, tcs, pairs)
    sets = ev.baseline_node_sets()
    assert set(sets) == {"embeddings_and_errors", "features_only"}
    emb = {i for i in ev.universe if i.startswith("embed/")}
    assert set(sets["embeddings_and_errors"]) & set(sets["features_only"]) == emb
    assert set(sets["embeddings_and_errors"]) | set(sets["features_only"]) == set(ev.universe)
    # exact transcoder: the features carry everything
    assert ev.faithfulness(sets["features_only"]) == pytest.approx(1.0, abs=1e-4)
    assert ev.with_errors("live").faithfulness(sets["features_only"]) == pytest.approx(1.0, abs=1e-4)
    mn, tn, pn = noisy
    evn = FeatureCircuitEvaluator(mn, tn, pn)
    assert abs(evn.faithfulness(evn.baseline_node_sets()["features_only"]) - 1.0) > 0.05


# ------------------------------------------------------------------------------------------ features_matter
def test_paired_evaluation_matches_per_prompt_evaluation(noisy):
    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs, errors="live")
    sets = _random_sets(ev.universe, len(pairs), seed=3)
    paired = ev.metric_per_prompt_paired([sets])[0]
    each = ev.metric_per_prompt(sets)
    assert torch.allclose(paired, torch.diagonal(each), atol=1e-6)


def test_features_matter_data_per_prompt_with_matched_random_control(noisy):
    from circuit_discovery.pipeline.feature_stage import features_matter_data, matched_random_features

    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs, errors="live")
    feats = [i for i in ev.relevant_universe if i.startswith("feature/")]
    rng = np.random.default_rng(0)
    ranked = list(rng.permutation(feats))
    circuit = ranked[:12] + ["error/L0/last"]
    k, n_random = 4, 5
    out = features_matter_data(ev, ranked, k, n_random, seed=1, circuit=circuit)
    n = len(pairs)
    assert out["necessity_features"] == ranked[:k]
    for key in ("feature_ablation_drop", "random_feature_ablation_drop", "clean_metric", "random_feature_shortfall"):
        assert len(out[key]) == n
    per = ev.metric_per_prompt([ev.universe, [i for i in ev.universe if i not in ranked[:k]]])
    assert np.allclose(out["feature_ablation_drop"], (per[0] - per[1]).numpy(), atol=1e-9)
    assert out["random_feature_ablation_drop"] != out["feature_ablation_drop"]
    if out.get("steer_features"):
        assert len(out["steering_flips"]) == n and set(out["steering_flips"]) <= {0, 1}
        assert len(out["steering_random_flip_rate"]) == n
        assert all(0.0 <= r <= 1.0 for r in out["steering_random_flip_rate"])
        assert all(i.split("/")[-1].startswith("subject") for i in out["steer_features"])
    # matched draws: same count per (layer, role), from the prompt's active features outside the circuit
    want = Counter((i.split("/")[1], i.split("/")[-1]) for i in ranked[:k])
    for i in range(n):
        active = set(ev.active_features(i))
        draws, short = matched_random_features(ev, ranked[:k], i, 20, np.random.default_rng(i), exclude=circuit)
        for d in draws:
            assert not set(d) & set(circuit) and set(d) <= active
            got = Counter((x.split("/")[1], x.split("/")[-1]) for x in d)
            assert sum(got.values()) == k - short
            assert all(got[key] <= c for key, c in want.items()) and set(got) <= set(want)
        assert len({tuple(sorted(d)) for d in draws}) > 1 or short == k  # the draws vary


def test_feature_stage_validation_outputs():
    """The pipeline's feature stage: replacement and live numbers, baselines, per-graph scores, and the per-prompt
    features_matter data on the held-out prompts only."""
    from circuit_discovery.pipeline import RunConfig
    from circuit_discovery.pipeline.feature_stage import feature_circuit_for_relation

    m = load_model("tiny-gemma3", device="cpu")
    tcs = _transcoders(m)
    pairs = _pairs(m, n=6)
    cfg = RunConfig(model="tiny-gemma3", node_threshold=0.99, edge_threshold=0.999, min_metric_gap=0.0,
                    feature_nodes=20, feature_facts=3, steer_features=3, steer_random=4, n_random=19)
    out = feature_circuit_for_relation(m, tcs, "capital_city", {"discovery": pairs[:3], "held_out": pairs[3:]},
                                       cfg)
    v = out["validation"]
    assert out["n_discovery"] == 3 and out["n_held_out"] == 3 and v["n_prompts"] == 3
    for key in ("replacement_score", "completeness_score", "error_influence_share"):
        assert len(v[key]) == 3 and all(0.0 <= x <= 1.0 for x in v[key])
    assert v["faithfulness_replacement"] == v["faithfulness"]
    assert v["faithfulness_live"] is not None and v["held_out_faithfulness_live"] is not None
    assert set(v["baselines"]) == {"circuit_without_errors", "embeddings_and_errors", "features_only"}
    assert v["held_out"]["n_prompts"] == 3 and v["curve"]["faithfulness"][-1] == pytest.approx(1.0)
    assert v["features_matter_prompts"] == "held_out" and v["features_matter_n_prompts"] == 3
    assert v["circuit_feature_nodes"] > 0
    for key in ("feature_ablation_drop", "random_feature_ablation_drop", "steering_flips",
                "steering_random_flip_rate"):
        assert len(v[key]) == 3, key
    assert len(v["steering_random_flips"]) == 3 * cfg.steer_random


def test_features_matter_necessity_has_power_against_planted_features(noisy):
    """Plant the 'circuit': the features whose single ablation lowers the metric most. Their joint ablation must
    drop the metric more than matched random features on every prompt on average."""
    from circuit_discovery.pipeline.feature_stage import features_matter_data

    m, tcs, pairs = noisy
    ev = FeatureCircuitEvaluator(m, tcs, pairs, errors="live")
    feats = [i for i in ev.relevant_universe if i.startswith("feature/")]
    per = ev.metric_per_prompt([ev.universe] + [[u for u in ev.universe if u != f] for f in feats])
    drop = (per[0][None] - per[1:]).mean(1)
    ranked = [feats[i] for i in torch.argsort(drop, descending=True).tolist()]
    out = features_matter_data(ev, ranked, 4, 20, seed=0, circuit=ranked[:4])
    assert np.mean(out["feature_ablation_drop"]) > np.mean(out["random_feature_ablation_drop"]) + 1e-3
    # the reversed ranking (features whose ablation raises the metric) does not beat random features
    rev = features_matter_data(ev, ranked[::-1], 4, 20, seed=0, circuit=ranked[::-1][:4])
    assert np.mean(rev["feature_ablation_drop"]) < np.mean(rev["random_feature_ablation_drop"])


@pytest.mark.parametrize("errors", ["frozen", "live"])
def test_evaluated_metric_equals_the_graphs_linear_prediction(noisy, errors):
    """With attention and norms frozen (the graph's local replacement model), zero-ablating last-layer sources
    (error nodes, which hold the capped features, and feature nodes) changes the logit difference by exactly minus
    the sum of their graph edges to the answer and counterfactual logits: the evaluator's ids are the graph's
    nodes."""
    from circuit_discovery.attribution.feature_graph import FrozenReplay, _prompt_state

    m, tcs, pairs = noisy
    p = pairs[0]
    a, c = int(p.answer_tokens[0]), int(p.counterfactual_tokens[0])
    res = feature_graph(m, tcs, list(p.clean_tokens), extra_logits=[a, c], max_feature_nodes=6,
                        roles=list(p.roles))
    assert res.n_visited < res.n_active_features
    g = res.graph
    ia = next(i for i in g.logit_indices if g.nodes[i].node.index == a)
    ic = next(i for i in g.logit_indices if g.nodes[i].node.index == c)
    ev = FeatureCircuitEvaluator.from_graphs(m, tcs, [p], [res], ablation="zero", errors=errors)
    L = m.cfg.n_layers
    last_layer = [i for i in ev.universe if i.split("/")[1] == f"L{L - 1}"]
    assert any(i.startswith("feature/") for i in last_layer) and any(i.startswith("error/") for i in last_layer)
    # some active last-layer features were not visited: the graph folded them into its error nodes
    visited = {(nd.node.position, nd.node.index) for nd in g.nodes if nd.node.component == "feature"
               and nd.node.layer == L - 1}
    st_acts = tcs[L - 1].encode(m.run_with_cache(torch.tensor([list(p.clean_tokens)]),
                                                 names=[f"blocks.{L - 1}.mlp.hook_in"],
                                                 return_logits=False)[1][f"blocks.{L - 1}.mlp.hook_in"][0])
    n_tok = len(p.clean_tokens)
    active_last = {(n_tok - 1, f) for f in (st_acts[-1] != 0).nonzero().flatten().tolist()}
    assert active_last - visited  # folded at the last position, where layer L-1 reaches the logits
    replay = FrozenReplay(m)
    _prompt_state(m, torch.tensor([list(p.clean_tokens)]), tcs, replay)  # records the frozen values
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(6):
        S = [i for i in last_layer if rng.random() < 0.5] or last_layer[:1]
        with torch.no_grad(), replay.replaying():
            full, ablated = ev.metric_per_prompt([ev.universe, [u for u in ev.universe if u not in S]])[:, 0]
        pred = 0.0
        for s, nd in enumerate(g.nodes):
            if nd.node.component in ("feature", "error") and nd.node.layer == L - 1:
                rid = (f"feature/L{L - 1}/I{nd.node.index}/{nd.role}" if nd.node.component == "feature"
                       else f"error/L{L - 1}/{nd.role}")
                if rid in S:
                    pred -= float(g.adjacency[ia, s] - g.adjacency[ic, s])
        assert float(ablated - full) == pytest.approx(pred, abs=1e-4 * max(1.0, abs(pred)))
        checked += abs(pred) > 1e-3
    assert checked >= 3


# ------------------------------------------------------------------------------------------ dictionary quality
GOOD = {"explained_variance": 0.9, "ce_loss_score": 0.95, "dead_fraction": 0.01, "l0": 32.0}


def test_dictionary_quality_contract_fails_on_each_bar():
    from circuit_discovery.pipeline.feature_stage import QUALITY_BAR, dictionary_quality

    keys = [f"blocks.{l}.mlp.hook_in->blocks.{l}.hook_mlp_out" for l in range(3)]
    ok = dictionary_quality({k: dict(GOOD) for k in keys}, "trained here: topk_transcoder, 100,000 tokens/layer",
                            trained_tokens=100_000, expected=keys)
    assert ok["meets_bar"] and ok["layers_below_bar"] == [] and ok["bar"] == QUALITY_BAR
    assert set(ok) == {"meets_bar", "bar", "layers_below_bar", "source", "advice"}
    bad_values = {"explained_variance": 0.79, "ce_loss_score": -0.2, "dead_fraction": 0.11, "l0": 65.0}
    for metric, bad in bad_values.items():
        layers = {k: dict(GOOD) for k in keys}
        layers[keys[1]][metric] = bad
        q = dictionary_quality(layers, "s", trained_tokens=21_000, expected=keys)
        assert not q["meets_bar"] and q["layers_below_bar"] == [keys[1]], metric
        assert "sae_training_tokens" in q["advice"] and "--dictionaries" in q["advice"]
    nan = {k: dict(GOOD) for k in keys}
    nan[keys[0]]["ce_loss_score"] = float("nan")
    assert dictionary_quality(nan, "s", expected=keys)["layers_below_bar"] == [keys[0]]
    missing = dictionary_quality({k: dict(GOOD) for k in keys[:2]}, "loaded: x", expected=keys)
    assert missing["layers_below_bar"] == [keys[2]] and "loaded dictionaries" in missing["advice"]
    unmeasured = dictionary_quality({}, "s", expected=keys)
    assert not unmeasured["meets_bar"] and "sae_eval_tokens" in unmeasured["advice"]
    assert not dictionary_quality({}, "s")["meets_bar"]  # nothing known is not a pass


def test_feature_circuits_below_the_bar_are_not_validated():
    from circuit_discovery.pipeline.feature_stage import dictionary_quality, feature_metrics

    held = {"faithfulness": 0.9, "ci": [0.8, 1.0], "random_p": 0.001, "node_share": 0.05, "n_prompts": 5}
    key = "blocks.0.mlp.hook_in->blocks.0.hook_mlp_out"
    good = dictionary_quality({key: GOOD}, "s", expected=[key])
    bad = dictionary_quality({key: {**GOOD, "ce_loss_score": 0.5}}, "s", trained_tokens=1000, expected=[key])
    m = feature_metrics({"held_out": held, "dictionary_quality": good}, {})
    assert m["validated"] and m["not_validated_reason"] is None and m["dictionary_quality"] == good
    m = feature_metrics({"held_out": held, "dictionary_quality": bad}, {})
    reason = m["not_validated_reason"]
    assert not m["validated"] and key in reason and "sae_training_tokens" in reason
    m = feature_metrics({"held_out": held}, {})
    assert not m["validated"] and "unknown" in m["not_validated_reason"]
    m = feature_metrics({"held_out": {**held, "faithfulness": 0.5}, "dictionary_quality": good}, {})
    assert not m["validated"] and "held-out" in m["not_validated_reason"]
