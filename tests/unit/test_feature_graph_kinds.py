"""Feature graphs on every transcoder kind: per-layer JumpReLU / TopK transcoders, affine skip transcoders, cross-layer
transcoders (JumpReLU; TopK without ReLU), reading ``mlp.hook_in``, ``ln2.hook_normalized`` or ``hook_resid_mid``.

The dictionaries are built here with random weights (exactness does not depend on their quality). Oracles are the
dictionary modules themselves (``hidden_pre``, ``encode``, ``decode``, ``x @ skip``) and the real model's hooks, not
the engine's own affine reading. Tolerances (float32): sums of incoming edges + bias reproduce every node's input to
1e-5 of the largest input; a performed intervention changes each downstream input by its edge weight to 1e-5 of the
largest edge.
"""
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution.feature_graph import (
    DictionaryView,
    FrozenReplay,
    _prompt_state,
    feature_graph,
    graph_scores,
    replacement_inputs,
)
from circuit_discovery.sae import SAEConfig, create_sae
from circuit_discovery.sae.pretrained import PretrainedDictionary
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder, DictionaryMismatchError, TranscoderSet

PROMPT = "The Eiffel Tower is in the city of"
D_SAE = 48


def _hook_rms(model, template):
    """Root-mean-square of the hook's value on PROMPT per layer (to scale random encoders sensibly)."""
    names = [template.format(layer=l) for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(model.to_tokens(PROMPT), names=names)
    return [float(cache[n][0, 1:].float().pow(2).mean().sqrt()) for n in names]


def _per_layer(model, template, *, skip=False, apply_b_dec=False, rescale=False, layers=None, seed=0, arch="jumprelu"):
    """JumpReLU (or TopK) transcoders (the loader's class) with random weights; with ``skip`` an affine skip matrix,
    with ``apply_b_dec`` / ``rescale`` SAELens's ``apply_b_dec_to_input`` / ``rescale_acts_by_decoder_norm`` (folded
    into the affine reading by the engine)."""
    d, L = model.cfg.d_model, model.cfg.n_layers
    rms = _hook_rms(model, template)
    out = {}
    for l in (range(L) if layers is None else layers):
        g = torch.Generator().manual_seed(seed + l)
        W_enc = torch.randn(d, D_SAE, generator=g) / (d ** 0.5 * rms[l]) * 2.0
        W_dec = torch.randn(D_SAE, d, generator=g) * 0.3 * (1 + torch.rand(D_SAE, 1, generator=g))
        out[l] = PretrainedDictionary(
            W_enc=W_enc, W_dec=W_dec, b_enc=0.1 * torch.randn(D_SAE, generator=g),
            b_dec=0.1 * torch.randn(d, generator=g), architecture=arch,
            threshold=(0.5 + 0.5 * torch.rand(D_SAE, generator=g)) if arch == "jumprelu" else None,
            k=5 if arch == "topk" else None,
            skip=(torch.randn(d, d, generator=g) * 0.5 / (d ** 0.5 * rms[l])) if skip else None,
            apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale, transcoder=True,
            hook_in=template.format(layer=l), hook_out=f"blocks.{l}.hook_mlp_out")
    return TranscoderSet(per_layer=out, hook_in=template)


def _topk(model, template, layers):
    """Our TopK transcoders (create_sae) at some layers only: the others are whole error nodes."""
    rms = _hook_rms(model, template)
    out = {}
    for l in layers:
        tc = create_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, architecture="topk", k=5, transcoder=True),
                        seed=l)
        with torch.no_grad():
            tc.W_enc.mul_(10.0 / rms[l])
            tc.b_enc.add_(0.01)
            tc.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(l))
        out[l] = tc.eval()
    return TranscoderSet(per_layer=out, hook_in=template)


def _clt(model, template, activation, skip=False):
    """A cross-layer transcoder with random weights (JumpReLU, or TopK without ReLU: negative activations kept;
    ``skip``: with Gemma Scope 2's affine skip per layer)."""
    d, L = model.cfg.d_model, model.cfg.n_layers
    rms = _hook_rms(model, template)
    c = CrossLayerTranscoder(L, d, D_SAE, activation=activation, k=6 if activation == "topk" else None,
                             hook_in=template, skip=skip)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for l in range(L):
            c.W_enc[l].copy_(torch.randn(d, D_SAE, generator=g) / (d ** 0.5 * rms[l]) * 2.0)
            c.W_dec[l].copy_(torch.randn(D_SAE, L - l, d, generator=g) * 0.2)
        c.b_enc.copy_(0.1 * torch.randn(L, D_SAE, generator=g))
        c.b_dec.copy_(0.1 * torch.randn(L, d, generator=g))
        c.threshold.copy_(0.5 + 0.5 * torch.rand(L, D_SAE, generator=g))
        if c.skip is not None:
            c.skip.copy_(torch.randn(L, d, d, generator=g) * 0.05 / torch.tensor(rms).reshape(L, 1, 1))
    return TranscoderSet(cross_layer=c, hook_in=template)


def _write_circuit_tracer(model, ts, folder):
    """Write ``ts`` in circuit-tracer's formats (``config.yaml`` + ``layer_{i}.safetensors`` with ``W_enc [d_sae,
    d_in]``, ``W_skip [d_out, d_in]``, ``activation_function.threshold``; or the CLT's ``W_enc_{i}`` /
    ``W_dec_{i}.safetensors``) and load it back with ``load_transcoder_set``."""
    import yaml
    from safetensors.torch import save_file

    from circuit_discovery.sae.pretrained import load_transcoder_set

    hook = ts.hook_in.removeprefix("blocks.{layer}.")
    cfg = {"model_name": model.cfg.model_name, "feature_input_hook": hook, "feature_output_hook": "hook_mlp_out",
           "model_kind": "cross_layer_transcoder" if ts.cross_layer is not None else "transcoder_set"}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    if ts.cross_layer is not None:
        c = ts.cross_layer
        for i in range(c.n_layers):
            save_file({f"W_enc_{i}": c.W_enc[i].detach().T.contiguous(), f"b_enc_{i}": c.b_enc[i].detach().clone(),
                       f"b_dec_{i}": c.b_dec[i].detach().clone(), f"threshold_{i}": c.threshold[i].detach().clone()},
                      str(folder / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": c.W_dec[i].detach().contiguous()}, str(folder / f"W_dec_{i}.safetensors"))
    else:
        for l, tc in ts.per_layer.items():
            t = {"W_enc": tc.W_enc.detach().T.contiguous(), "W_dec": tc.W_dec.detach().clone(),
                 "b_enc": tc.b_enc.detach().clone(), "b_dec": tc.b_dec.detach().clone(),
                 "activation_function.threshold": tc.threshold.detach().clone()}
            if tc.skip is not None:
                t["W_skip"] = tc.skip.detach().T.contiguous()
            save_file(t, str(folder / f"layer_{l}.safetensors"))
    loaded = load_transcoder_set(str(folder), model=model.cfg.model_name)
    assert loaded.kind == ts.kind and loaded.hook_in == ts.hook_in
    return loaded


KINDS = {
    "jumprelu@mlp_in": lambda m, tmp: _per_layer(m, "blocks.{layer}.mlp.hook_in"),
    "jumprelu_skip@normalized": lambda m, tmp: _per_layer(m, "blocks.{layer}.ln2.hook_normalized", skip=True,
                                                          apply_b_dec=True),
    "topk_rescaled@mlp_in": lambda m, tmp: _per_layer(m, "blocks.{layer}.mlp.hook_in", rescale=True, arch="topk",
                                                      seed=5),
    "jumprelu_skip@resid_mid": lambda m, tmp: _per_layer(m, "blocks.{layer}.hook_resid_mid", skip=True, seed=3),
    "topk_partial@resid_mid": lambda m, tmp: _topk(m, "blocks.{layer}.hook_resid_mid", layers=[0, 2]),
    "clt_jumprelu@mlp_in": lambda m, tmp: _clt(m, "blocks.{layer}.mlp.hook_in", "jumprelu"),
    "clt_jumprelu_skip@mlp_in": lambda m, tmp: _clt(m, "blocks.{layer}.mlp.hook_in", "jumprelu", skip=True),
    "clt_topk@normalized": lambda m, tmp: _clt(m, "blocks.{layer}.ln2.hook_normalized", "topk"),
    # written to files in circuit-tracer's formats by the test and loaded with load_transcoder_set
    "file_ct_skip@mlp_in": lambda m, tmp: _write_circuit_tracer(
        m, _per_layer(m, "blocks.{layer}.mlp.hook_in", skip=True, seed=9), tmp),
    "file_ct_clt@resid_mid": lambda m, tmp: _write_circuit_tracer(
        m, _clt(m, "blocks.{layer}.hook_resid_mid", "jumprelu"), tmp),
}
#: Gemma: RMSNorm with 1 + w gains and post-norms, every kind; GPT-2: LayerNorm (centred hook_normalized)
CASES = [("tiny-gemma3", k) for k in KINDS] + [("tiny-gpt2", "jumprelu_skip@normalized"),
                                              ("tiny-gpt2", "clt_topk@normalized")]
_MODELS: dict = {}


@pytest.fixture(params=CASES, ids=[f"{m}-{k}" for m, k in CASES])
def setup(request, tmp_path):
    name, kind = request.param
    if name not in _MODELS:
        _MODELS[name] = load_model(name, device="cpu")
    m = _MODELS[name]
    return m, KINDS[kind](m, tmp_path), kind


# ------------------------------------------------------------------ oracles from the dictionary modules
def _input_oracle(ts, l, x, f):
    """Feature ``f``'s input (pre-activation minus its value at x = 0) from the module's own ``hidden_pre``."""
    with torch.no_grad():
        if ts.cross_layer is not None:
            c = ts.cross_layer
            return float(c.hidden_pre(l, x)[..., f] - c.hidden_pre(l, torch.zeros_like(x))[..., f])
        tc = ts.per_layer[l]
        return float(tc.hidden_pre(x)[..., f] - tc.hidden_pre(torch.zeros_like(x))[..., f])


def _activation_oracle(ts, l, x):
    with torch.no_grad():
        return ts.cross_layer.encode(l, x) if ts.cross_layer is not None else ts.per_layer[l].encode(x)


def _write_oracle(ts, l, f, a, d):
    """``{target layer: vector}`` feature ``f`` of layer ``l`` with activation ``a`` writes (module ``decode``)."""
    with torch.no_grad():
        if ts.cross_layer is not None:
            c = ts.cross_layer
            one = torch.zeros(c.d_sae)
            one[f] = a
            return {t: c.decode({l: one}, t) - c.decode({l: torch.zeros(c.d_sae)}, t) for t in range(l, c.n_layers)}
        tc = ts.per_layer[l]
        one = torch.zeros(tc.cfg.d_sae)
        one[f] = a
        return {l: tc.decode(one) - tc.decode(torch.zeros_like(one))}


def _targets(g):
    return [i for i, nd in enumerate(g.nodes) if nd.kind in ("intermediate", "logit")]


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("cap", [10_000, 6])
def test_exact_for_every_kind(setup, cap):
    m, ts, _ = setup
    res = feature_graph(m, ts, PROMPT, max_feature_nodes=cap, batch_size=5)
    g = res.graph
    assert res.n_active_features > 6
    t = _targets(g)
    pred = g.adjacency.sum(1) + res.bias
    scale = float(res.node_input[t].abs().max())
    assert float((pred - res.node_input)[t].abs().max()) <= 1e-5 * scale
    src = [i for i, nd in enumerate(g.nodes) if nd.kind in ("embedding", "error")]
    assert float(g.adjacency[src].abs().max()) == 0.0
    sc = graph_scores(g)
    assert all(sc[k] is not None and 0.0 <= sc[k] <= 1.0 for k in sc)
    assert g.metadata["dictionary_kind"] == DictionaryView(m, ts).kind


def test_node_inputs_and_activations_are_the_modules_values(setup):
    """node_input = the module's pre-activation (minus its value at 0) at the real hook; activation = its encode."""
    m, ts, _ = setup
    res = feature_graph(m, ts, PROMPT, max_feature_nodes=25, batch_size=8)
    toks = m.to_tokens(PROMPT)
    _, cache = m.run_with_cache(toks, names=[ts.hook_in_at(l) for l in ts.layers])
    n_feat = 0
    for i, nd in enumerate(res.graph.nodes):
        if nd.node.component != "feature":
            continue
        l, p, f = nd.node.layer, nd.node.position, nd.node.index
        x = cache[ts.hook_in_at(l)][0, p]
        assert float(res.node_input[i]) == pytest.approx(_input_oracle(ts, l, x, f), rel=1e-4, abs=1e-4)
        assert nd.activation == pytest.approx(float(_activation_oracle(ts, l, x)[f]), rel=1e-5, abs=1e-6)
        n_feat += 1
    assert n_feat == 25


def test_frozen_replay_reproduces_the_hooks_and_the_output(setup):
    """At the prompt's own sources the replayed replacement model gives the real transcoder inputs (each hook kind)
    and the real final residual; with a skip the MLP output there is the real one."""
    m, ts, _ = setup
    toks = m.to_tokens(PROMPT)
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, ts, replay)
    with torch.no_grad():
        x_in, final = replacement_inputs(m, toks, replay, st.emb[None], {k: v[None] for k, v in st.mlp_out.items()},
                                         ts)
        real = m.final_hidden(toks)
        _, cache = m.run_with_cache(toks, names=[ts.hook_in_at(l) for l in ts.layers])
    assert torch.allclose(final, real, rtol=1e-5, atol=1e-5)
    for l in ts.layers:
        want = cache[ts.hook_in_at(l)][0].float()
        assert torch.allclose(x_in[l][0].float(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        tc = ts.per_layer.get(l)
        if tc is not None and getattr(tc, "skip", None) is not None:  # mlp_out is the real output minus x @ skip
            assert torch.allclose(st.mlp_out[l] + want @ tc.skip, st.mlp_true[l], atol=1e-5)


def test_interventions_match_edges_for_every_kind(setup):
    """Remove one feature's writes (module ``decode``; every target layer for a CLT) in the frozen replacement
    model: each downstream feature input and logit changes by minus its edge weight, including what flows through
    skip connections (recomputed live from the changed transcoder inputs)."""
    m, ts, name = setup
    res = feature_graph(m, ts, PROMPT, max_feature_nodes=10_000, batch_size=16)
    g = res.graph
    toks = m.to_tokens(PROMPT)
    replay = FrozenReplay(m)
    st = _prompt_state(m, toks, ts, replay)
    feats = [i for i, nd in enumerate(g.nodes) if nd.node.component == "feature"]
    logits = [i for i, nd in enumerate(g.nodes) if nd.kind == "logit"]
    W_U = m.W_U.detach()
    worst, checked, through_later_layers = 0.0, 0, 0
    for s in sorted(feats, key=lambda i: g.nodes[i].node.layer)[:6]:
        nd = g.nodes[s]
        l, p, f = nd.node.layer, nd.node.position, nd.node.index
        mlp = {k: v[None].clone() for k, v in st.mlp_out.items()}
        for t, vec in _write_oracle(ts, l, f, nd.activation, m.cfg.d_model).items():
            mlp[t][0, p] -= vec
            through_later_layers += t > l
        with torch.no_grad():
            x1, f1 = replacement_inputs(m, toks, replay, st.emb[None], mlp, ts)
        for t in feats + logits:
            tn = g.nodes[t]
            if tn.kind == "logit":
                new = float(f1[0, -1] @ (W_U[tn.node.index] - W_U.mean(0)))
            elif tn.node.layer > l:
                new = _input_oracle(ts, tn.node.layer, x1[tn.node.layer][0, tn.node.position], tn.node.index)
            else:
                continue
            worst = max(worst, abs(new - float(res.node_input[t]) + float(g.adjacency[t, s])))
            checked += 1
    assert checked > 10
    assert worst <= 1e-5 * float(g.adjacency.abs().max())
    assert (through_later_layers > 0) == ("clt" in name)


@pytest.mark.parametrize("cap", [10_000, 4])
def test_error_node_is_what_the_visited_features_do_not_write(setup, cap):
    """error(t, p) = real MLP output - skip term - b_dec[t] - the visited features' writes to layer t (module
    ``decode``): unvisited, BOS and (CLT) earlier layers' unvisited features are in it."""
    m, ts, _ = setup
    res = feature_graph(m, ts, PROMPT, max_feature_nodes=cap, batch_size=4)
    toks = m.to_tokens(PROMPT)
    st = _prompt_state(m, toks, ts, FrozenReplay(m))
    _, cache = m.run_with_cache(toks, names=[ts.hook_in_at(l) for l in ts.layers])
    want = {t: st.mlp_true[t].clone() for t in range(m.cfg.n_layers)}
    with torch.no_grad():
        for l in ts.layers:
            if ts.cross_layer is not None:
                want[l] -= ts.cross_layer.b_dec[l]
                if ts.cross_layer.skip is not None:
                    want[l] -= cache[ts.hook_in_at(l)][0] @ ts.cross_layer.skip[l]
            else:
                tc = ts.per_layer[l]
                want[l] -= tc.decode(torch.zeros(tc.cfg.d_sae))
                if getattr(tc, "skip", None) is not None:
                    want[l] -= cache[ts.hook_in_at(l)][0] @ tc.skip
    for nd in res.graph.nodes:
        if nd.node.component == "feature":
            for t, vec in _write_oracle(ts, nd.node.layer, nd.node.index, nd.activation, m.cfg.d_model).items():
                want[t][nd.node.position] -= vec
    for t in range(m.cfg.n_layers):
        assert torch.allclose(res.errors[t], want[t], atol=1e-5 * float(st.mlp_true[t].abs().max()) + 1e-6)


def test_topk_without_relu_keeps_negative_activations():
    m = load_model("tiny-gemma3", device="cpu")
    ts = _clt(m, "blocks.{layer}.mlp.hook_in", "topk")
    with torch.no_grad():
        ts.cross_layer.b_enc.sub_(50.0)  # every pre-activation negative: TopK without ReLU still selects k
    res = feature_graph(m, ts, PROMPT, max_feature_nodes=10_000, batch_size=16)
    acts = [nd.activation for nd in res.graph.nodes if nd.node.component == "feature"]
    assert res.n_active_features == 6 * m.cfg.n_layers * (len(m.to_tokens(PROMPT)[0]) - 1)
    assert all(a < 0 for a in acts)
    t = _targets(res.graph)
    pred = res.graph.adjacency.sum(1) + res.bias
    assert float((pred - res.node_input)[t].abs().max()) <= 1e-5 * float(res.node_input[t].abs().max())


# ------------------------------------------------------------------ bad input
def test_unsupported_hooks_and_shapes_are_refused():
    m = load_model("tiny-gemma3", device="cpu")
    ts = _per_layer(m, "blocks.{layer}.mlp.hook_in")
    with pytest.raises(DictionaryMismatchError, match="hook_resid_pre"):
        feature_graph(m, TranscoderSet(per_layer=ts.per_layer, hook_in="blocks.{layer}.hook_resid_pre"), PROMPT)
    with pytest.raises(DictionaryMismatchError, match="mlp.hook_post"):
        feature_graph(m, TranscoderSet(per_layer=ts.per_layer, hook_out="blocks.{layer}.mlp.hook_post"), PROMPT)
    # a transcoder that declares another hook than the set it is in
    with pytest.raises(DictionaryMismatchError, match="declares hook_in"):
        feature_graph(m, TranscoderSet(per_layer=ts.per_layer, hook_in="blocks.{layer}.hook_resid_mid"), PROMPT)
    c = CrossLayerTranscoder(m.cfg.n_layers + 1, m.cfg.d_model, 8)
    with pytest.raises(DictionaryMismatchError, match="covers 5 layers"):
        feature_graph(m, c, PROMPT)
    wide = CrossLayerTranscoder(m.cfg.n_layers, m.cfg.d_model + 1, 8)
    with pytest.raises(DictionaryMismatchError, match="d_model"):
        feature_graph(m, wide, PROMPT)


def test_a_dictionary_that_is_not_affine_as_read_is_refused():
    """A transcoder whose pre-activations are not ``x @ W_enc + b_enc`` (here: an input normalisation the engine
    would not know about) is refused, not mis-attributed."""
    m = load_model("tiny-gemma3", device="cpu")
    tc = _per_layer(m, "blocks.{layer}.mlp.hook_in", layers=[1]).per_layer[1]

    class Normalising(PretrainedDictionary):
        def hidden_pre(self, x):
            return super().hidden_pre(x / x.norm(dim=-1, keepdim=True))

    odd = Normalising(W_enc=tc.W_enc.data, W_dec=tc.W_dec.data, b_enc=tc.b_enc.data, b_dec=tc.b_dec.data,
                      architecture="jumprelu", threshold=tc.threshold, transcoder=True)
    with pytest.raises(DictionaryMismatchError, match="not affine"):
        feature_graph(m, {1: odd}, PROMPT)


# ------------------------------------------------------------------ the feature-circuit evaluator on every kind
def _pairs(model, n=3):
    from collections import Counter

    from circuit_discovery.facts import build_pairs, load_builtin

    pairs = [p for p in build_pairs(load_builtin()["capital_city"], model.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    length = Counter(len(p.clean_tokens) for p in pairs).most_common(1)[0][0]
    return [p for p in pairs if len(p.clean_tokens) == length][:n]


def _make_exact(model, ts):
    """Replace every MLP of a model without post-norms by the set's reconstruction from its own input (a CLT's from
    every earlier layer's input too): the dictionaries become exact (zero error) and ``mlp.hook_in`` is their
    input."""
    acts: dict[int, torch.Tensor] = {}

    def forward(x, l):
        if ts.cross_layer is not None:
            acts[l] = ts.cross_layer.encode(l, x)
            return ts.cross_layer.decode({s: a for s, a in acts.items() if s <= l}, l)
        out = ts.per_layer[l](x)  # PretrainedDictionary.forward: decode(encode(x)) + x @ skip
        return out.recon
    for l, layer in enumerate(model._layers):
        layer.mlp.forward = (lambda x, l=l: forward(x, l))
    return model


EXACT_KINDS = ["jumprelu_skip@mlp_in", "clt_jumprelu@mlp_in", "clt_topk@mlp_in"]


def _exact_kind(name):
    m = load_model("tiny-llama", device="cpu")
    ts = {"jumprelu_skip@mlp_in": lambda: _per_layer(m, "blocks.{layer}.mlp.hook_in", skip=True, seed=11),
          "clt_jumprelu@mlp_in": lambda: _clt(m, "blocks.{layer}.mlp.hook_in", "jumprelu"),
          "clt_topk@mlp_in": lambda: _clt(m, "blocks.{layer}.mlp.hook_in", "topk")}[name]()
    return _make_exact(m, ts), ts


@pytest.mark.parametrize("name", EXACT_KINDS)
def test_evaluator_live_equals_frozen_with_exact_dictionaries(name):
    """With zero error everywhere the replacement model (frozen errors) is the real model (live errors) for any
    node set -- skip terms and cross-layer writes included; N and the empty set give the clean and corrupted runs."""
    from circuit_discovery.metrics import batch_from_pairs, get_metric
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    m, ts = _exact_kind(name)
    pairs = _pairs(m)
    fr = FeatureCircuitEvaluator(m, ts, pairs, errors="frozen")
    lv = fr.with_errors("live")
    gen = torch.Generator().manual_seed(0)
    sets = [[u for u in fr.universe if float(torch.rand(1, generator=gen)) < q] for q in (0.2, 0.5, 0.8)]
    a, b = fr.metric_per_prompt(sets + [fr.universe, []]), lv.metric_per_prompt(sets + [fr.universe, []])
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert float((a[0] - a[-2]).abs().max()) > 1e-3  # the sets do something
    # zero error except at BOS, whose features are in its error node (include_bos=False)
    assert max(float(fr.error_vectors(i)[:, 1:].abs().max()) for i in range(len(pairs))) < 1e-5
    bt, cb = batch_from_pairs(m, pairs), batch_from_pairs(m, pairs, corrupted=True)
    metric = get_metric("logit_diff")
    with torch.no_grad():
        clean = metric(m, m.final_hidden(bt.tokens, bt.mask), bt).double()
        corr = metric(m, m.final_hidden(cb.tokens, cb.mask), bt).double()
    assert torch.allclose(a[-2], clean, atol=1e-4) and torch.allclose(a[-1], corr, atol=1e-4)


@pytest.mark.parametrize("kind", ["jumprelu_skip@normalized", "clt_jumprelu@mlp_in", "topk_partial@resid_mid"])
def test_graph_and_evaluator_error_nodes_agree_for_every_kind(kind, tmp_path):
    """``FeatureCircuitEvaluator.from_graphs`` means the graphs' error vectors (capped graphs: unvisited features in
    them); zero-ablating one feature in live mode is the real model with that feature's writes (module ``decode``,
    every target layer) removed."""
    from circuit_discovery.metrics import batch_from_pairs, get_metric
    from circuit_discovery.validation.features import FeatureCircuitEvaluator

    m = load_model("tiny-gemma3", device="cpu")
    ts = KINDS[kind](m, tmp_path)
    pairs = _pairs(m, 2)
    res = [feature_graph(m, ts, list(p.clean_tokens), max_feature_nodes=6, roles=list(p.roles)) for p in pairs]
    assert all(r.n_visited < r.n_active_features for r in res)
    ev = FeatureCircuitEvaluator.from_graphs(m, ts, pairs, res, ablation="zero", errors="live")
    for i, r in enumerate(res):
        assert torch.allclose(ev.error_vectors(i), r.errors, atol=1e-5 * float(r.errors.abs().max()))
    # one feature node at the last position, zero-ablated in the real model
    nd = next(nd for nd in res[0].graph.nodes if nd.node.component == "feature" and nd.role == "last")
    fid = f"feature/L{nd.node.layer}/I{nd.node.index}/last"
    got = ev.metric_per_prompt([[u for u in ev.universe if u != fid]])[0]
    b = batch_from_pairs(m, pairs)
    _, cache = m.run_with_cache(b.tokens, names=[ts.hook_in_at(nd.node.layer)], attention_mask=b.mask)
    last = torch.tensor([[r == "last" for r in p.roles] for p in pairs])
    a = _activation_oracle(ts, nd.node.layer, cache[ts.hook_in_at(nd.node.layer)])[..., nd.node.index]  # [b, n]
    hooks = []
    for t, vec in _write_oracle(ts, nd.node.layer, nd.node.index, 1.0, m.cfg.d_model).items():
        hooks.append((f"blocks.{t}.hook_mlp_out",
                      lambda x, _, vec=vec: x - ((a * last)[..., None] * vec).to(x.dtype)))
    with torch.no_grad(), m.hooks(hooks):
        manual = get_metric("logit_diff")(m, m.final_hidden(b.tokens, b.mask), b).double()
    assert torch.allclose(got, manual, atol=1e-4)
    assert float((got - ev.metric_per_prompt([ev.universe])[0]).abs().max()) > 1e-6  # the feature matters


# ------------------------------------------------------------------ the feature stage on loaded dictionaries
def test_stage_loads_a_set_checks_it_and_states_its_quality(tmp_path):
    """``cfg.dictionaries``: the set is loaded, evaluated per layer on the held-out corpus and its quality contract
    reaches every feature circuit's validation; random dictionaries are below the bar, so not a finding."""
    from circuit_discovery.pipeline import RunConfig
    from circuit_discovery.pipeline.feature_stage import dictionaries, feature_circuit_for_relation, feature_metrics

    m = load_model("tiny-gemma3", device="cpu")
    folder = tmp_path / "set"
    folder.mkdir()
    _write_circuit_tracer(m, _per_layer(m, "blocks.{layer}.mlp.hook_in", skip=True, seed=9), folder)
    cfg = RunConfig(model="tiny-gemma3", dictionaries=str(folder), cache_dir=str(tmp_path / "cache"),
                    sae_eval_tokens=64, node_threshold=0.99, edge_threshold=0.999, min_metric_gap=0.0,
                    feature_nodes=10, feature_facts=2, steer_features=2, steer_random=2, n_random=19)
    ds, js = dictionaries(m, cfg)
    keys = [f"blocks.{l}.mlp.hook_in->blocks.{l}.hook_mlp_out" for l in range(m.cfg.n_layers)]
    assert js["kind"] == "jumprelu_skip_transcoder" and js["source"] == f"loaded: {folder}"
    assert sorted(js["layers"]) == sorted(keys)
    assert all(set(v) >= {"explained_variance", "ce_loss_score", "dead_fraction", "l0"} for v in js["layers"].values())
    q = js["dictionary_quality"]
    assert not q["meets_bar"] and sorted(q["layers_below_bar"]) == sorted(keys) and "--dictionaries" in q["advice"]
    assert len(ds.transcoders) == m.cfg.n_layers  # per-layer sets index like {layer: transcoder}
    pairs = _pairs(m, 4)
    out = feature_circuit_for_relation(m, ds.transcoders, "capital_city",
                                       {"discovery": pairs[:2], "held_out": pairs[2:]}, cfg)
    v = out["validation"]
    assert v["dictionary_quality"] == q and v["dictionary_kind"] == "jumprelu_skip_transcoder"
    assert all(0.0 <= x <= 1.0 for k in ("replacement_score", "completeness_score", "error_influence_share")
               for x in v[k])
    met = feature_metrics(v, out)
    assert met["validated"] is False and "below the quality bar" in met["not_validated_reason"]


def test_stage_refuses_a_set_that_does_not_fit_before_any_work(tmp_path, monkeypatch):
    from circuit_discovery.pipeline import RunConfig, feature_stage
    from circuit_discovery.sae import corpus

    m = load_model("tiny-gemma3", device="cpu")
    other = load_model("tiny-llama", device="cpu")  # 3 layers, same width: a CLT over 3 layers
    folder = tmp_path / "clt"
    folder.mkdir()
    _write_circuit_tracer(other, _clt(other, "blocks.{layer}.mlp.hook_in", "jumprelu"), folder)

    def no_work(*a, **k):
        raise AssertionError("work started before the dictionaries were checked")

    monkeypatch.setattr(corpus, "build_corpus", no_work)
    cfg = RunConfig(model="tiny-gemma3", dictionaries=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DictionaryMismatchError, match="3 layers") as e:
        feature_stage.dictionaries(m, cfg)
    assert "\n" not in str(e.value)


def test_cross_layer_quality_is_perfect_for_an_exact_clt():
    """``evaluate_cross_layer``: with every MLP replaced by the CLT, each layer's EV and CE-loss score are 1, and so
    is the fully spliced model's; L0 counts each layer's active features."""
    from circuit_discovery.pipeline.feature_stage import evaluate_cross_layer

    m, ts = _exact_kind("clt_jumprelu@mlp_in")
    texts = ["The Eiffel Tower is in Paris. The Colosseum is in Rome.", "Berlin is the capital of Germany."]
    q = evaluate_cross_layer(m, ts, texts, n_tokens=24)
    assert len(q) == m.cfg.n_layers
    for row in q.values():
        assert row["explained_variance"] == pytest.approx(1.0, abs=1e-5)
        assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
        assert row["ce_loss_score_all_layers"] == pytest.approx(1.0, abs=1e-4)
        assert 0 < row["l0"] <= D_SAE and 0.0 <= row["dead_fraction"] <= 1.0 and row["n_tokens"] == 21
    # the same CLT on the model it does not reproduce: the metrics can fail
    plain = load_model("tiny-llama", device="cpu")
    q2 = evaluate_cross_layer(plain, ts, texts, n_tokens=24)
    assert all(row["explained_variance"] < 0.9 and row["ce_loss_score_all_layers"] < 0.99 for row in q2.values())
    # per layer it is the trainer's evaluate_clt (one target at a time), computed for all targets in one pass
    from circuit_discovery.sae.clt_training import evaluate_clt

    for t in range(plain.cfg.n_layers):
        ref = evaluate_clt(plain, ts.cross_layer, t, texts, n_tokens=24)
        row = q2[f"blocks.{t}.mlp.hook_in->blocks.{t}.hook_mlp_out"]
        for k in ("explained_variance", "ce_loss_score", "l0", "dead_fraction"):
            assert row[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), (t, k)
