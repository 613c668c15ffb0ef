"""Transcoder feature graphs and feature circuits on the built-in Gemma 3 270M.

Transcoders for every layer are trained here at a tiny budget (2,048 tokens each, into a temporary cache): the
checks below are about exactness, which holds for any dictionary -- the error nodes carry what it misses. The
quality of the default-budget transcoders is measured by ``frc train-sae`` (the ``dictionaries`` stage; docs/sae.md).
Tolerances (float32): sums of incoming edges + bias reproduce every node's input to 1e-4 of the largest input;
a performed intervention changes each downstream input by its edge weight to 1e-4 of the largest edge.
"""
import pytest
import torch

from circuit_discovery.graph.neuronpedia import default_schema_path

pytestmark = pytest.mark.integration

SCHEMA = default_schema_path()  # the copy shipped as package data


@pytest.fixture(scope="module")
def transcoders(real_model, tmp_path_factory):
    from circuit_discovery.sae.dictionaries import train_transcoders

    ds = train_transcoders(real_model, training_tokens=2048, cache_dir=tmp_path_factory.mktemp("saes"),
                           progress=False)
    assert sorted(ds.transcoders) == list(range(real_model.cfg.n_layers))
    return ds.transcoders


@pytest.fixture(scope="module")
def pairs(real_model):
    from circuit_discovery.facts import build_pairs, load_builtin

    return [p for p in build_pairs(load_builtin()["capital_city"], real_model.tokenizer)
            if p.corruption == "subject_swap" and p.first_token_differs][:2]


def test_feature_graph_is_exact_and_interventions_match(real_model, transcoders, pairs):
    from circuit_discovery.attribution.feature_graph import (
        FrozenReplay,
        _prompt_state,
        feature_graph,
        replacement_inputs,
    )

    m, p = real_model, pairs[0]
    res = feature_graph(m, transcoders, list(p.clean_tokens), max_feature_nodes=96, batch_size=32,
                        extra_logits=[p.answer_tokens[0], p.counterfactual_tokens[0]])
    g = res.graph
    assert res.n_visited == 96 and res.n_active_features > 96
    tgt = [i for i, nd in enumerate(g.nodes) if nd.kind in ("intermediate", "logit")]
    err = (g.adjacency.sum(1) + res.bias - res.node_input)[tgt].abs().max()
    assert float(err) <= 1e-4 * float(res.node_input[tgt].abs().max()), float(err)
    assert p.answer_tokens[0] in res.logit_tokens and p.counterfactual_tokens[0] in res.logit_tokens

    toks = torch.tensor([list(p.clean_tokens)])
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, transcoders, replay)
    feats = [i for i, nd in enumerate(g.nodes) if nd.node.component == "feature"]
    worst, n_checked = 0.0, 0
    for s in sorted(feats, key=lambda i: g.nodes[i].node.layer)[:3]:  # early features have downstream targets
        nd = g.nodes[s]
        l, pos, f = nd.node.layer, nd.node.position, nd.node.index
        mlp = {k: v[None].clone() for k, v in st.mlp_out.items()}
        mlp[l][0, pos] -= nd.activation * transcoders[l].W_dec[f].detach()
        with torch.no_grad():
            x1, _ = replacement_inputs(m, toks, replay, st.emb[None], mlp, transcoders)
        for t in feats:
            tn = g.nodes[t]
            if tn.node.layer <= l:
                continue
            w = transcoders[tn.node.layer].W_enc[:, tn.node.index].detach()
            new = float(x1[tn.node.layer][0, tn.node.position] @ w)
            worst = max(worst, abs(new - float(res.node_input[t]) + float(g.adjacency[t, s])))
            n_checked += 1
    assert n_checked > 50
    assert worst <= 1e-4 * float(g.adjacency.abs().max()), worst

    if SCHEMA.is_file():
        import json

        import jsonschema

        from circuit_discovery.graph.neuronpedia import to_neuronpedia, validate_neuronpedia

        data = to_neuronpedia(g, slug="capital-features", scan="gemma-3-270m")
        jsonschema.validate(data, json.loads(SCHEMA.read_text()))
        validate_neuronpedia(data, json.loads(SCHEMA.read_text()))


def test_feature_circuit_evaluator_references(real_model, transcoders, pairs):
    from circuit_discovery.attribution.feature_graph import feature_circuit
    from circuit_discovery.metrics import batch_from_pairs, get_metric
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    m = real_model
    r = feature_circuit(m, transcoders, pairs, max_feature_nodes=64)
    ev = FeatureCircuitEvaluator(m, transcoders, pairs)
    mf, me = ev.references()
    b, cb = batch_from_pairs(m, pairs), batch_from_pairs(m, pairs, corrupted=True)
    metric = get_metric("logit_diff")
    with torch.no_grad():
        clean = float(metric(m, m.final_hidden(b.tokens, b.mask), b).mean())
        corr = float(metric(m, m.final_hidden(cb.tokens, cb.mask), b).mean())
    assert mf == pytest.approx(clean, abs=1e-3) and me == pytest.approx(corr, abs=1e-3)
    ids = [n.id for n in r.circuit.nodes if not n.id.startswith("logit")]
    f = ev.faithfulness([i for i in ids if i in set(ev.universe)])
    print(f"\nfeature circuit (tiny-budget transcoders): {len(ids)} nodes of {len(ev.universe)}, f = {f:.3f}")
    assert len(ids) < 0.1 * len(ev.universe)


@pytest.fixture(scope="module", params=["jumprelu_skip_transcoder", "clt"])
def trained_kind(request, real_model, tmp_path_factory):
    """A skip transcoder set and a cross-layer transcoder trained here at a tiny budget (2,048 tokens; exactness
    holds for any dictionary), through the trainer's ``train_transcoders(kind=...)``."""
    from circuit_discovery.sae.dictionaries import train_transcoders

    ds = train_transcoders(real_model, training_tokens=2048, kind=request.param,
                           cache_dir=tmp_path_factory.mktemp(f"saes-{request.param}"), progress=False)
    return request.param, ds.transcoder_set


def test_skip_and_cross_layer_graphs_are_exact_and_interventions_match(real_model, trained_kind, pairs):
    """The exactness and intervention checks of the per-layer test above, for a skip transcoder (its skip term
    recomputed from the changed inputs) and a CLT (a feature's writes to every later layer removed)."""
    from circuit_discovery.attribution.feature_graph import (
        DictionaryView,
        FrozenReplay,
        _prompt_state,
        feature_graph,
        replacement_inputs,
    )

    kind, ts = trained_kind
    m, p = real_model, pairs[0]
    view = DictionaryView(m, ts)
    assert view.kind == kind and (kind != "jumprelu_skip_transcoder" or len(view.skip) == m.cfg.n_layers)
    res = feature_graph(m, view, list(p.clean_tokens), max_feature_nodes=64, batch_size=32,
                        extra_logits=[p.answer_tokens[0], p.counterfactual_tokens[0]])
    g = res.graph
    assert res.n_visited == 64 and res.n_active_features > 64
    tgt = [i for i, nd in enumerate(g.nodes) if nd.kind in ("intermediate", "logit")]
    err = (g.adjacency.sum(1) + res.bias - res.node_input)[tgt].abs().max()
    assert float(err) <= 1e-4 * float(res.node_input[tgt].abs().max()), float(err)
    sc = res.scores()
    assert all(v is not None and 0.0 <= v <= 1.0 for v in sc.values())
    print(f"\n{kind}: replacement {sc['replacement_score']:.3f}, completeness {sc['completeness_score']:.3f}, "
          f"error share {sc['error_influence_share']:.3f}")

    toks = torch.tensor([list(p.clean_tokens)])
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, view, replay)
    feats = [i for i, nd in enumerate(g.nodes) if nd.node.component == "feature"]
    worst, n_checked = 0.0, 0
    for s in sorted(feats, key=lambda i: g.nodes[i].node.layer)[:2]:
        nd = g.nodes[s]
        l, pos, f = nd.node.layer, nd.node.position, nd.node.index
        mlp = {k: v[None].clone() for k, v in st.mlp_out.items()}
        for t in view.targets(l):
            mlp[t][0, pos] -= nd.activation * view.dec(l, t)[f]
        with torch.no_grad():
            x1, _ = replacement_inputs(m, toks, replay, st.emb[None], mlp, view)
        for t in feats:
            tn = g.nodes[t]
            if tn.node.layer <= l:
                continue
            new = float(x1[tn.node.layer][0, tn.node.position] @ view.W_enc[tn.node.layer][:, tn.node.index])
            worst = max(worst, abs(new - float(res.node_input[t]) + float(g.adjacency[t, s])))
            n_checked += 1
    assert n_checked > 30
    assert worst <= 1e-4 * float(g.adjacency.abs().max()), worst
