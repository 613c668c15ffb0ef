"""Feature graphs over transcoder features: exactness (inputs = incoming edges + bias), performed interventions
under frozen attention and norms, the feature-node cap, and the Neuronpedia export.

Tolerances: float32 models; sums of edges reproduce each node's input to 1e-5 of the largest input, and an
intervention changes each downstream input by its edge weight to 1e-5 of the largest edge.
"""
import importlib

import jsonschema
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution.feature_graph import FrozenReplay, _prompt_state, feature_graph, replacement_inputs
from circuit_discovery.errors import InputError
from circuit_discovery.graph.neuronpedia import default_schema_path, to_neuronpedia, validate_neuronpedia
from circuit_discovery.sae import SAEConfig, create_sae

PROMPT = "The Eiffel Tower is in the city of"
SCHEMA = default_schema_path()  # the copy shipped as package data


def _transcoders(model, skip=()):
    out = {}
    for l in range(model.cfg.n_layers):
        if l in skip:
            continue
        tc = create_sae(SAEConfig(d_in=model.cfg.d_model, architecture="topk", k=4, transcoder=True), seed=l)
        with torch.no_grad():  # random transcoders with non-trivial activations and biases
            tc.W_enc.mul_(10.0)
            tc.b_enc.add_(0.01)
            tc.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(l))
        out[l] = tc.eval()
    return out


@pytest.fixture(scope="module", params=["tiny-gemma3", "tiny-llama", "tiny-gpt2"])
def setup(request):
    m = load_model(request.param, device="cpu")
    skip = (1,) if request.param == "tiny-gpt2" else ()  # a layer without transcoder: its MLP is an error node
    return m, _transcoders(m, skip)


def _targets(g):
    return [i for i, nd in enumerate(g.nodes) if nd.kind in ("intermediate", "logit")]


@pytest.mark.parametrize("cap", [10_000, 7])
def test_node_input_is_sum_of_incoming_edges_plus_bias(setup, cap):
    m, tcs = setup
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=cap, batch_size=5)
    g = res.graph
    t = _targets(g)
    assert res.n_visited == min(cap, res.n_active_features)
    assert sum(nd.node.component == "feature" for nd in g.nodes) == res.n_visited
    pred = g.adjacency.sum(1) + res.bias
    scale = float(res.node_input[t].abs().max())
    assert float((pred - res.node_input)[t].abs().max()) <= 1e-5 * scale
    # sources have no incoming edges
    src = [i for i, nd in enumerate(g.nodes) if nd.kind in ("embedding", "error")]
    assert float(g.adjacency[src].abs().max()) == 0.0


def test_node_inputs_are_the_real_models_values(setup):
    """node_input comes from the ordinary (unfrozen) forward pass: the transcoder pre-activation and the logit."""
    m, tcs = setup
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=20, batch_size=8)
    toks = m.to_tokens(PROMPT)
    names = [f"blocks.{l}.mlp.hook_in" for l in tcs]
    logits, cache = m.run_with_cache(toks, names=names, return_logits=True)
    u_mean = m.W_U.mean(0)
    for i, nd in enumerate(res.graph.nodes):
        if nd.node.component == "feature":
            l, p, f = nd.node.layer, nd.node.position, nd.node.index
            pre = (tcs[l].hidden_pre(cache[f"blocks.{l}.mlp.hook_in"][0, p]) - tcs[l].b_enc).detach()
            assert float(res.node_input[i]) == pytest.approx(float(pre[f]), rel=1e-5, abs=1e-5)
            assert nd.activation == pytest.approx(float(tcs[l].encode(cache[names[list(tcs).index(l)]][0, p])[f]),
                                                  rel=1e-5)
        elif nd.kind == "logit" and m.softcap is None:
            t = nd.node.index
            h = m.final_hidden(toks)[0, -1]
            assert float(res.node_input[i]) == pytest.approx(float(h @ (m.W_U[t] - u_mean)), rel=1e-4, abs=1e-4)


def test_intervention_changes_downstream_inputs_by_edge_weight(setup):
    """Removing one upstream feature (frozen attention and norms, other MLP outputs held) changes each downstream
    feature's input by minus its edge weight, and each logit likewise."""
    m, tcs = setup
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=10_000, batch_size=16)
    g = res.graph
    toks = m.to_tokens(PROMPT)
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, tcs, replay)
    feats = [i for i, nd in enumerate(g.nodes) if nd.node.component == "feature"]
    logits = [i for i, nd in enumerate(g.nodes) if nd.kind == "logit"]
    W_U = m.W_U.detach()
    worst, checked = 0.0, 0
    for s in feats[:8]:
        nd = g.nodes[s]
        l, p, f = nd.node.layer, nd.node.position, nd.node.index
        mlp = {k: v[None].clone() for k, v in st.mlp_out.items()}
        mlp[l][0, p] -= nd.activation * tcs[l].W_dec[f].detach()
        with torch.no_grad():
            x1, f1 = replacement_inputs(m, toks, replay, st.emb[None], mlp, tcs)
        for t in feats + logits:
            tn = g.nodes[t]
            if tn.kind == "logit":
                new = float(f1[0, -1] @ (W_U[tn.node.index] - W_U.mean(0)))
            elif tn.node.layer > l:
                w = tcs[tn.node.layer].W_enc[:, tn.node.index].detach()
                new = float(x1[tn.node.layer][0, tn.node.position] @ w)
            else:
                continue
            worst = max(worst, abs(new - float(res.node_input[t]) + float(g.adjacency[t, s])))
            checked += 1
    assert checked > 20
    assert worst <= 1e-5 * float(g.adjacency.abs().max())


@pytest.mark.parametrize("cap", [10_000, 5])
def test_error_node_is_mlp_out_minus_b_dec_and_visited_features(setup, cap):
    """One error-node definition (shared with FeatureCircuitEvaluator): what the MLP writes at (layer, position)
    minus b_dec and the visited features' decoder contributions -- unvisited and BOS features included."""
    m, tcs = setup
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=cap, batch_size=8)
    st = _prompt_state(m, m.to_tokens(PROMPT), tcs, FrozenReplay(m))
    recon = {l: st.mlp_out[l].clone() for l in range(m.cfg.n_layers)}
    for l, tc in tcs.items():
        recon[l] = recon[l] - tc.b_dec.detach()
    for nd in res.graph.nodes:
        if nd.node.component == "feature":
            l, p, f = nd.node.layer, nd.node.position, nd.node.index
            recon[l][p] -= nd.activation * tcs[l].W_dec[f].detach()
    for l in range(m.cfg.n_layers):
        assert torch.allclose(res.errors[l], recon[l], atol=1e-5 * float(st.mlp_out[l].abs().max()) + 1e-6)


def test_frozen_replay_reproduces_the_forward_pass(setup):
    m, tcs = setup
    toks = m.to_tokens(PROMPT)
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, tcs, replay)
    with torch.no_grad():
        _, final = replacement_inputs(m, toks, replay, st.emb[None], {k: v[None] for k, v in st.mlp_out.items()}, tcs)
        real = m.final_hidden(toks)
    assert torch.allclose(final, real, rtol=1e-5, atol=1e-5)


def test_cap_visits_features_by_influence_and_logit_nodes():
    m = load_model("tiny-gemma3", device="cpu")
    tcs = _transcoders(m)
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=5, batch_size=2, extra_logits=[7])
    g = res.graph
    assert res.n_visited == 5
    assert 7 in res.logit_tokens
    assert abs(float(g.logit_probabilities.sum())) <= 1.0 + 1e-6
    # no BOS features by default
    assert all(nd.node.position != 0 for nd in g.nodes if nd.node.component == "feature")
    full = feature_graph(m, tcs, PROMPT, max_feature_nodes=5, batch_size=2, include_bos=True)
    assert full.n_active_features > res.n_active_features


def test_promoted_token_labels_are_cached_outside_the_transcoder(monkeypatch):
    features = importlib.import_module(feature_graph.__module__)  # the module; the package exports the function

    m = load_model("tiny-gemma3", device="cpu")
    tcs = _transcoders(m)
    first = [nd.label for nd in feature_graph(m, tcs, PROMPT, max_feature_nodes=6, batch_size=3).graph.nodes]
    assert all("_frc_promoted" not in vars(tc) for tc in tcs.values())
    assert any(tc in features._PROMOTED for tc in tcs.values())

    def no_call(*args, **kwargs):
        raise AssertionError("promoted tokens were recomputed")

    monkeypatch.setattr(features, "direction_logit_effects", no_call)  # the second graph reads the cache
    again = [nd.label for nd in feature_graph(m, tcs, PROMPT, max_feature_nodes=6, batch_size=3).graph.nodes]
    assert again == first and any("→" in lab for lab in first)


def test_bad_dictionaries_raise_typed_errors():
    m = load_model("tiny-gemma3", device="cpu")
    with pytest.raises(InputError, match="transcoder"):
        feature_graph(m, {}, PROMPT)
    sae = create_sae(SAEConfig(d_in=m.cfg.d_model, architecture="topk", k=4))
    with pytest.raises(InputError, match="SAE, not a transcoder"):
        feature_graph(m, {0: sae}, PROMPT)
    with pytest.raises(InputError, match="out of range"):
        feature_graph(m, {99: sae}, PROMPT)


def test_feature_graph_exports_to_neuronpedia():
    import json

    schema = json.loads(SCHEMA.read_text())
    m = load_model("tiny-gemma3", device="cpu")
    tcs = _transcoders(m)
    res = feature_graph(m, tcs, PROMPT, max_feature_nodes=30, batch_size=10, labels={(1, 3): "label <b>"})
    data = to_neuronpedia(res.graph, slug="tiny-eiffel", scan="tiny-gemma3", node_threshold=1.0, edge_threshold=1.0)
    jsonschema.validate(data, schema)
    validate_neuronpedia(data, schema)
    L = m.cfg.n_layers
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    for n in data["nodes"]:
        parts = n["node_id"].split("_")
        if n["feature_type"] == "cross layer transcoder":
            assert len(parts) == 3 and int(parts[0]) < L and int(parts[1]) >= 0
        elif n["feature_type"] == "mlp reconstruction error":
            assert parts[1] == "-1"
        elif n["feature_type"] == "embedding":
            assert parts[0] == "E"
        elif n["feature_type"] == "logit":
            assert parts[0] == str(L + 1)
    assert any(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    assert data["metadata"]["prompt"] == PROMPT


# ------------------------------------------------------------------ relation circuits and their evaluation
def _relation_setup():
    from collections import Counter

    from circuit_discovery.facts import build_pairs, load_builtin

    m = load_model("tiny-gemma3", device="cpu")
    pairs = [p for p in build_pairs(load_builtin()["capital_city"], m.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    length = Counter(len(p.clean_tokens) for p in pairs).most_common(1)[0][0]
    return m, _transcoders(m), [p for p in pairs if len(p.clean_tokens) == length][:3]


def test_feature_circuit_combines_prompts_by_role():
    from circuit_discovery.attribution.feature_graph import decoder_directions, feature_circuit
    from circuit_discovery.graph import find_supernodes

    m, tcs, pairs = _relation_setup()
    r = feature_circuit(m, tcs, pairs, max_feature_nodes=40, batch_size=20)
    c = r.circuit
    assert c.relation == pairs[0].relation and len(c.facts) == 3
    assert 0 < len(c.nodes) < r.combined.n_nodes
    assert 0.0 < c.attribution_score <= 1.0
    roles = {p for pair in pairs for p in pair.roles}
    for nd in c.nodes:
        comp = nd.id.split("/")[0]
        assert comp in ("feature", "error", "embed", "logit")
        assert nd.id.split("/")[-1] in roles
    assert r.info["visited_features_per_prompt"] == [40, 40, 40]
    g = r.graphs[0].graph
    dirs = decoder_directions(g, tcs)
    feats = [nd.id for nd in g.nodes if nd.node.component == "feature"]
    assert set(dirs) == set(feats)
    sn = find_supernodes(g, node_ids=feats, decoder_directions=dirs, distance_threshold=1.5)
    assert all(len(s.node_ids) >= 2 for s in sn)


@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
def test_feature_evaluator_references(ablation):
    from circuit_discovery.metrics import batch_from_pairs, get_metric
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    m, tcs, pairs = _relation_setup()
    ev = FeatureCircuitEvaluator(m, tcs, pairs, ablation=ablation)
    assert ev.faithfulness(ev.universe) == pytest.approx(1.0, abs=1e-9)
    assert ev.faithfulness([]) == pytest.approx(0.0, abs=1e-9)
    mf, me = ev.references()
    b = batch_from_pairs(m, pairs)
    metric = get_metric("logit_diff")
    with torch.no_grad():
        clean = float(metric(m, m.final_hidden(b.tokens, b.mask), b).mean())
    assert mf == pytest.approx(clean, abs=1e-5)
    if ablation == "corrupted":  # everything ablated = the corrupted run, scored on the clean answers
        cb = batch_from_pairs(m, pairs, corrupted=True)
        with torch.no_grad():
            corr = float(metric(m, m.final_hidden(cb.tokens, cb.mask), b).mean())
        assert me == pytest.approx(corr, abs=1e-5)
    assert any(i.startswith("feature/") for i in ev.universe)
    with pytest.raises(InputError):
        ev.metric_of([["head/L0/I0/last"]])
    with pytest.raises(InputError):
        ev.metric_of([["feature/L0/I0/P3"]])


def test_feature_details_give_contexts_and_labels(tmp_path):
    from circuit_discovery.pipeline import RunConfig
    from circuit_discovery.pipeline.feature_stage import feature_details
    from circuit_discovery.report.viewer import write_viewer

    m = load_model("tiny-gemma3", device="cpu")
    tcs = _transcoders(m)
    nodes = [{"id": f"feature/L{l}/I{f}/last", "component": "feature", "layer": l, "index": f}
             for l, f in ((0, 1), (1, 3), (1, 5))] + [{"id": "error/L0/last", "component": "error", "layer": 0}]
    cfg = RunConfig(model="tiny-gemma3", cache_dir=str(tmp_path), feature_context_tokens=256)
    d = feature_details(m, tcs, {"r": {"circuit": {"nodes": nodes}}}, cfg)
    assert set(d) == {"feature/L0/I1", "feature/L1/I3", "feature/L1/I5"}
    for v in d.values():
        assert v["label"] and len(v["promoted"]) == 5 and 0 <= v["density"] <= 1
        assert len(v["suppressed"]) == 5  # the 5 tokens with the most negative direct logit effect
        assert all("«" in c for c in v["contexts"])
    assert any(v["contexts"] for v in d.values())
    cj = {"model": "tiny", "circuits": [{"name": "r", "relation": "r", "nodes": [
        {"id": "feature/L1/I3/last", "component": "feature", "layer": 1, "role": "last", "index": 3, "label": "x",
         "score": 1.0}, {"id": "logit/L4/last", "component": "logit", "layer": 4, "role": "last", "label": "y"}],
        "edges": [{"source": "feature/L1/I3/last", "target": "logit/L4/last", "weight": 1.0}]}]}
    html = write_viewer(tmp_path, cj, feature_details=d).read_text()
    assert "promoted" in html and "feature/L1/I3" in html  # the details travel into the viewer
