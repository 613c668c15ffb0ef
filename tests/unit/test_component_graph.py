"""Component graphs (EAP / EAP-IG): checked against autograd, exact identities and performed interventions."""
from collections import Counter

import numpy as np
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution.component_graph import (
    component_circuit,
    component_edge_scores,
    component_graphs,
    head_outputs,
    ig_points,
)
from circuit_discovery.errors import InputError
from circuit_discovery.facts import build_pairs, load_builtin
from circuit_discovery.graph import prune_graph
from circuit_discovery.metrics import batch_from_pairs, get_metric


def _model(name):
    m = load_model(name, device="cpu")
    m.hf_model.double()
    return m


def _pairs(model, n=2):
    pairs = [p for p in build_pairs(load_builtin()["capital_city"], model.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    length = Counter(len(p.clean_tokens) for p in pairs).most_common(1)[0][0]
    return [p for p in pairs if len(p.clean_tokens) == length][:n]


@pytest.fixture(scope="module")
def gemma3():
    return _model("tiny-gemma3")


@pytest.fixture(scope="module")
def llama():
    return _model("tiny-llama")


def _metric(model, tokens, hooks=()):
    batch_tokens = tokens
    with torch.no_grad(), model.hooks(list(hooks)):
        return model.final_hidden(batch_tokens)


def _m(model, batch, hooks=()):
    with torch.no_grad(), model.hooks(list(hooks)):
        return get_metric("logit_diff")(model, model.final_hidden(batch.tokens, batch.mask), batch)


# ------------------------------------------------------------------------------------------ basics
def test_ig_points_rules():
    a, w = ig_points(1)
    assert a == [1.0] and w == [1.0]
    for rule in ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"):
        a, w = ig_points(4, rule)
        assert np.isclose(sum(w), 1.0)
        assert all(0.0 <= x <= 1.0 for x in a)
        # integral of alpha over [0, 1] is 1/2: exact for middle / trapezoid / Gauss, off by 1/(2n) for left/right
        expect = {"riemann_right": 0.5 + 1 / 8, "riemann_left": 0.5 - 1 / 8}.get(rule, 0.5)
        assert np.isclose(np.dot(a, w), expect)
    with pytest.raises(InputError):
        ig_points(0)
    with pytest.raises(InputError):
        ig_points(3, "simpson")


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama", "tiny-gpt2"])
def test_heads_sum_to_attn_out(name):
    m = _model(name)
    toks = m.to_tokens("The capital of France is")
    _, cache = m.run_with_cache(toks, return_logits=False)
    for l in range(m.cfg.n_layers):
        h = head_outputs(m, l, cache[f"blocks.{l}.attn.hook_z"]).sum(2)
        out = cache[f"blocks.{l}.hook_attn_out"]
        bias = getattr(getattr(m.hf_model.transformer.h[l].attn, "c_proj", None), "bias", None) \
            if name == "tiny-gpt2" else None
        if bias is not None:
            out = out - bias
        # Gemma/Llama RMSNorms compute in float32 internally, hence the float32-level tolerance
        torch.testing.assert_close(h, out, rtol=1e-5, atol=1e-6)


def test_bad_input(gemma3):
    pairs = _pairs(gemma3)
    with pytest.raises(InputError):
        component_edge_scores(gemma3, pairs, granularity="neuron")
    with pytest.raises(InputError):
        component_edge_scores(gemma3, pairs, method="acdc")
    with pytest.raises(InputError):
        component_edge_scores(gemma3, [])


# ------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_eap_ig_one_step_equals_eap(gemma3, granularity):
    pairs = _pairs(gemma3)
    _, A1, s1, _ = component_edge_scores(gemma3, pairs, granularity=granularity, method="eap")
    _, A2, s2, _ = component_edge_scores(gemma3, pairs, granularity=granularity, method="eap-ig", n_steps=1)
    torch.testing.assert_close(A1, A2, rtol=0, atol=1e-12)
    assert A1.abs().sum() > 0


def test_logit_edges_sum_to_metric_difference_for_linear_readout():
    """With the final norm removed, logit_diff is linear in the final residual, so the direct edges into the
    logit add up to m(clean) - m(corrupted) exactly, for EAP and for EAP-IG."""
    m = _model("tiny-llama")
    m.hf_model.model.norm = torch.nn.Identity()
    pairs = _pairs(m)
    for method, steps in (("eap", 1), ("eap-ig", 3)):
        _, A, _, ex = component_edge_scores(m, pairs, method=method, n_steps=steps)
        total = A[:, -1].sum(-1)
        torch.testing.assert_close(total, ex["m_clean"] - ex["m_corrupted"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_per_query_attention_gradients_sum_to_full_gradient(gemma3, granularity):
    """Summed over query positions (and heads), the attention-only gradients equal autograd's gradient at
    hook_attn_in of an ordinary clean backward pass."""
    pairs = _pairs(gemma3)
    _, _, _, ex = component_edge_scores(gemma3, pairs, granularity=granularity, method="eap")
    batch = batch_from_pairs(gemma3, pairs)
    L = gemma3.cfg.n_layers
    store = {}

    def keep(x, name):
        y = x.clone()
        store[name] = y
        return y
    params = [p for p in gemma3.hf_model.parameters()]
    for p in params:
        p.requires_grad_(False)
    emb = gemma3.embed(batch.tokens).detach().requires_grad_(True)
    with gemma3.hooks([("hook_embed", lambda x, n: emb)] + [(f"blocks.{l}.hook_attn_in", keep) for l in range(L)]):
        mval = get_metric("logit_diff")(gemma3, gemma3.final_hidden(batch.tokens, batch.mask), batch)
    g = torch.autograd.grad(mval.sum(), [store[f"blocks.{l}.hook_attn_in"] for l in range(L)])
    for p in params:
        p.requires_grad_(True)
    # the models' RMSNorms compute in float32 internally: float32-level tolerance
    torch.testing.assert_close(ex["attn_in_grad"], torch.stack(g, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_vmapped_attention_vjps_equal_one_pass_per_query(gemma3, granularity, alpha):
    """The one-forward, vmapped-backward per-query attention gradients equal the reference (a forward cut after
    each query position and one backward per query)."""
    from circuit_discovery.attribution.component_graph import ComponentLayout, _attention_vjps, _attention_vjps_all

    pairs = _pairs(gemma3)
    batch = batch_from_pairs(gemma3, pairs)
    corr = batch_from_pairs(gemma3, pairs, corrupted=True).tokens
    b, n = batch.tokens.shape
    L, cfg = gemma3.cfg.n_layers, gemma3.cfg
    layout = ComponentLayout(L, cfg.n_heads, n, granularity)
    torch.manual_seed(0)
    shape = (b, n, cfg.n_heads, cfg.d_head) if granularity == "head" else (b, n, cfg.d_model)
    g_attn = [torch.randn(shape) for _ in range(L)]
    with torch.no_grad():
        ec, er = gemma3.embed(batch.tokens), gemma3.embed(corr)
    fast = _attention_vjps_all(gemma3, batch.tokens, ec, er, alpha, g_attn, layout)
    for q in range(n):
        ref = _attention_vjps(gemma3, batch.tokens, ec, er, alpha, g_attn, q, layout)
        torch.testing.assert_close(fast[q], ref, rtol=1e-4, atol=1e-6)


def test_node_score_is_attribution_patching(llama):
    """Sum of a node's outgoing edges = (a(clean) - a(corr)) . dm/da from autograd (llama: heads are linear in z)."""
    pairs = _pairs(llama)
    layout, A, scores, _ = component_edge_scores(llama, pairs, method="eap")
    batch = batch_from_pairs(llama, pairs)
    corr = batch_from_pairs(llama, pairs, corrupted=True)
    L, n = llama.cfg.n_layers, layout.n_pos
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    _, cc = llama.run_with_cache(corr.tokens, names=names, return_logits=False)
    store = {}

    def keep(x, name):
        y = x.clone()
        store[name] = y
        return y
    with llama.hooks([(nm, keep) for nm in names]):
        mval = get_metric("logit_diff")(llama, llama.final_hidden(batch.tokens, batch.mask), batch)
    grads = dict(zip(names, torch.autograd.grad(mval.sum(), [store[nm] for nm in names])))
    for l in range(L):
        z = f"blocks.{l}.attn.hook_z"
        ap = ((store[z] - cc[z]) * grads[z]).sum(-1)  # [b, pos, H]
        for h in range(layout.n_heads):
            s = layout.attn_slot(l, h)
            torch.testing.assert_close(scores[:, s * n:(s + 1) * n], ap[:, :, h].detach(), rtol=1e-4, atol=1e-6)
        mo = f"blocks.{l}.hook_mlp_out"
        ap = ((store[mo] - cc[mo]) * grads[mo]).sum(-1)
        s = layout.mlp_slot(l)
        torch.testing.assert_close(scores[:, s * n:(s + 1) * n], ap.detach(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ interventions
def _edge_effect(model, pair, layout, delta, src, dst, eps):
    """m(clean with only the edge src -> dst patched by eps * (corr - clean)) - m(clean)."""
    n, L = layout.n_pos, layout.n_layers
    batch = batch_from_pairs(model, [pair])
    s, p = divmod(src, n)
    add = torch.zeros(1, n, model.cfg.d_model, dtype=torch.float64)
    add[0, p] = -eps * delta[s, p]
    base = _m(model, batch)
    if dst == layout.n_nodes - 1:
        hooks = [(f"blocks.{L - 1}.hook_resid_post", lambda x, nm: x + add)]
        return float(_m(model, batch, hooks) - base)
    t, q = divmod(dst, n)
    tnode = layout.node(t, q)
    if tnode.component == "mlp_out":
        hooks = [(f"blocks.{tnode.layer}.hook_mlp_in", lambda x, nm: x + add)]
        return float(_m(model, batch, hooks) - base)
    # attention target: compute the patched output at q, then splice only that output into a clean run
    l = tnode.layer
    out_name = f"blocks.{l}.attn.hook_z" if tnode.component == "head" else f"blocks.{l}.hook_attn_out"
    cap = {}
    with torch.no_grad(), model.hooks([(f"blocks.{l}.hook_attn_in", lambda x, nm: x + add),
                                       (out_name, lambda x, nm: cap.__setitem__("v", x.clone()))]):
        model.final_hidden(batch.tokens, batch.mask)

    def splice(x, nm):
        y = x.clone()
        if tnode.component == "head":
            y[:, q, tnode.index] = cap["v"][:, q, tnode.index]
        else:
            y[:, q] = cap["v"][:, q]
        return y
    return float(_m(model, batch, [(out_name, splice)]) - base)


@pytest.mark.parametrize("granularity", ["head", "layer"])
def test_edge_patch_matches_score_to_first_order(gemma3, granularity):
    """Finite-difference check: patching one edge by eps * (corr - clean) changes m by -eps * score (central
    differences; the models' norms compute in float32, so eps is not tiny)."""
    pairs = _pairs(gemma3, n=1)
    layout, A, _, ex = component_edge_scores(gemma3, pairs, granularity=granularity, method="eap")
    A, delta = A[0], ex["delta"][0].double()
    tgt, src = A.nonzero(as_tuple=True)
    order = torch.argsort(A[tgt, src].abs(), descending=True)
    # the strongest edges of each kind of target
    picked, kinds = [], Counter()
    for i in order.tolist():
        t = int(tgt[i])
        kind = "logit" if t == layout.n_nodes - 1 else layout.node(*divmod(t, layout.n_pos)).component
        if kinds[kind] < 2:
            kinds[kind] += 1
            picked.append((int(src[i]), t))
    assert set(kinds) == {"logit", "mlp_out", "head" if granularity == "head" else "attn_out"}
    eps = 1e-2
    for s, t in picked:
        eff = (_edge_effect(gemma3, pairs[0], layout, delta, s, t, eps)
               - _edge_effect(gemma3, pairs[0], layout, delta, s, t, -eps)) / (2 * eps)
        assert eff == pytest.approx(-float(A[t, s]), rel=1e-2, abs=1e-5), (s, t)


def test_full_edge_patch_correlates_with_score(llama):
    """Patching whole edges (eps = 1): the actual effect tracks -score (first-order method on a random model)."""
    pairs = _pairs(llama, n=1)
    layout, A, _, ex = component_edge_scores(llama, pairs, granularity="head", method="eap")
    A, delta = A[0], ex["delta"][0].double()
    tgt, src = A.nonzero(as_tuple=True)
    order = torch.argsort(A[tgt, src].abs(), descending=True)[:25]
    pred = [-float(A[tgt[i], src[i]]) for i in order.tolist()]
    act = [_edge_effect(llama, pairs[0], layout, delta, int(src[i]), int(tgt[i]), 1.0) for i in order.tolist()]
    r = np.corrcoef(pred, act)[0, 1]
    assert r > 0.75, r  # measured 0.84 on this random model (seed 0); whole-edge patches are not infinitesimal


# ------------------------------------------------------------------------------------------ graphs and circuits
def test_graphs_and_relation_circuit(gemma3):
    pairs = [p for p in build_pairs(load_builtin()["capital_city"], gemma3.tokenizer)
             if p.corruption == "subject_swap"][:3]
    graphs = component_graphs(gemma3, pairs, method="eap", granularity="head")
    assert len(graphs) == len(pairs)
    for g, p in zip(graphs, pairs):
        n = len(p.clean_tokens)
        assert g.n_nodes == (1 + gemma3.cfg.n_layers * (gemma3.cfg.n_heads + 1)) * n + 1
        # DAG: every edge goes from a lower layer (embed = -1) to a higher layer, or attention -> MLP of one layer
        tgt, src = (g.adjacency != 0).nonzero(as_tuple=True)
        for t, s in zip(tgt.tolist(), src.tolist()):
            a, b = g.nodes[s].node, g.nodes[t].node
            assert a.layer < b.layer or (a.layer == b.layer and b.component == "mlp_out"
                                         and a.component in ("head", "attn_out"))
            assert a.position <= b.position
        pr = prune_graph(g)
        assert pr.node_mask[-1]
    res = component_circuit(gemma3, pairs, method="eap")
    ids = res.circuit.node_ids
    assert any(i.startswith("logit/") for i in ids)
    assert all(i.split("/")[-1] in {"bos", "subject_first", "subject_middle", "subject_last", "relation_first",
                                    "relation", "last"} for i in ids)
    assert res.info["nodes_after"] < res.info["nodes_before"]
    assert res.info["edges_after"] <= res.info["edges_before"]
    assert res.ranked_nodes()[0] != "logit"
