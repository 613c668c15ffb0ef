"""A planted mechanism with a known answer: discovery must find it, validation must pass on it and fail without it.

The model is a random 3-layer Gemma 3 (the ``tiny-gemma3`` configuration with 16 heads per layer, so that a
baseline matched on (component, layer, role) has more than a handful of heads to draw from). The output weights of
every attention head (``o_proj`` columns) and every MLP (``down_proj``) are zeroed except a chosen set: two heads
of layer 0 and the MLP of layer 2; then only the planted set is trained (40 Adam steps on the clean-minus-corrupted
logit difference of subject-swap pairs, one planted component silenced per step so that each carries a clear share;
the zeroed columns get no update), so the model "knows" the relation through the planted set only.

Known answer. Layer 0's heads read the token embeddings only, and no attention after layer 0 is alive, so a
component's output at a position other than the last one reaches nothing; hence the carriers are exactly the planted
components at the ``last`` role: ``head/L0/I3/last``, ``head/L0/I9/last``, ``mlp_out/L2/last`` (besides embeddings).
Every other head and MLP outputs exactly zero on every prompt (checked below).
"""
from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pytest
import torch

from circuit_discovery.attribution.component_graph import component_circuit, head_outputs
from circuit_discovery.facts import build_pairs, load_builtin
from circuit_discovery.metrics import batch_from_pairs, get_metric
from circuit_discovery.models.arch import arch_for, get_module
from circuit_discovery.models.hooked import HookedModel
from circuit_discovery.validation import curves
from circuit_discovery.validation.ablation import CircuitEvaluator, parse_component_id

HEADS = ((0, 3), (0, 9))
MLPS = (2,)
N_HEADS = 16
ALPHA = 0.05
PLANTED = {"head/L0/I3/last", "head/L0/I9/last", "mlp_out/L2/last"}


def _build_model(n_heads: int = N_HEADS, n_layers: int = 3, seed: int = 0) -> HookedModel:
    """``tiny-gemma3`` (same tokenizer, width and weight scale) with ``n_heads`` heads and ``n_layers`` layers."""
    import transformers as tf

    from circuit_discovery.models.loading import _randomize_norms, tiny_config, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = tiny_config("tiny-gemma3", vocab_size=len(tok))
    cfg.num_attention_heads = n_heads
    cfg.num_hidden_layers = n_layers
    cfg.layer_types = ["sliding_attention"] * (n_layers - 1) + ["full_attention"]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    _randomize_norms(hf, gen)
    return HookedModel(hf, tok, arch_for(cfg.model_type), model_name="planted-gemma3")


def _output_weights(model, heads, mlps):
    """``[(weight, keep mask)]`` for every layer's ``o_proj`` (planted heads' columns kept) and ``down_proj``."""
    c = model.cfg
    out = []
    for l in range(c.n_layers):
        W = get_module(model._layers[l], model.spec.z_proj).weight  # [d_model, n_heads * d_head]
        keep = torch.zeros_like(W)
        for hl, h in heads:
            if hl == l:
                keep[:, h * c.d_head:(h + 1) * c.d_head] = 1
        out.append((W, keep))
        D = get_module(model._layers[l], model.spec.mlp_post_proj).weight
        out.append((D, torch.full_like(D, float(l in mlps))))
    return out


def _pairs(model):
    pairs = [p for p in build_pairs(load_builtin()["capital_city"], model.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    n = Counter(len(p.clean_tokens) for p in pairs).most_common(1)[0][0]
    return [p for p in pairs if len(p.clean_tokens) == n]


def _gap(model, pairs) -> torch.Tensor:
    """Per pair: logit difference on the clean prompt minus the same on the corrupted prompt."""
    f = get_metric("logit_diff")
    b, cb = batch_from_pairs(model, pairs), batch_from_pairs(model, pairs, corrupted=True)
    return f(model, model.final_hidden(b.tokens, b.mask), b) - f(model, model.final_hidden(cb.tokens, cb.mask), b)


def _plant(model, pairs, heads=HEADS, mlps=MLPS, steps: int = 40, lr: float = 3e-2):
    weights = _output_weights(model, heads, mlps)
    with torch.no_grad():
        for W, keep in weights:
            W.mul_(keep)
    attn_layers = sorted({l for l, _ in heads})
    params = [p for l in attn_layers for p in get_module(model._layers[l], model.spec.attn).parameters()]
    params += [p for l in mlps for p in get_module(model._layers[l], "mlp").parameters()]
    for p in model.hf_model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        opt.zero_grad()
        # carrier dropout: one planted component (or none) is silenced per step, so every carrier must carry the
        # fact without each other one and none ends up a faint carrier that influence pruning may legitimately
        # drop (the known answer must be clear-cut)
        drops = [(f"blocks.{l}.attn.hook_z", _drop_head(h)) for l, h in heads]
        drops += [(f"blocks.{l}.hook_mlp_out", lambda x, _n: torch.zeros_like(x)) for l in mlps]
        k = int(torch.randint(len(drops) + 1, (1,), generator=gen))
        hooks = drops[k:k + 1]
        with torch.enable_grad(), model.hooks(hooks):
            loss = -_gap(model, pairs).clamp(max=10.0).mean()
        loss.backward()
        for W, keep in weights:
            if W.grad is not None:
                W.grad.mul_(keep)  # zeroed outputs stay exactly zero (Adam moves nothing with zero gradients)
        opt.step()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for W, keep in weights:
            assert torch.equal(W * keep, W)


def _drop_head(h: int):
    def fn(z, _name):
        z = z.clone()
        z[:, :, h] = 0
        return z
    return fn


@contextlib.contextmanager
def _knocked_out(model, heads=(), mlps=()):
    """Zero the output weights of ``heads`` [(layer, head)] and ``mlps`` [layer] for the duration."""
    c = model.cfg
    saved = []
    with torch.no_grad():
        for l, h in heads:
            W = get_module(model._layers[l], model.spec.z_proj).weight
            saved.append((W, W.detach().clone()))
            W[:, h * c.d_head:(h + 1) * c.d_head] = 0
        for l in mlps:
            D = get_module(model._layers[l], model.spec.mlp_post_proj).weight
            saved.append((D, D.detach().clone()))
            D.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for W, old in reversed(saved):
                W.copy_(old)


def _zero_components(model, pairs) -> set[tuple[str, int, int | None]]:
    """(component, layer, head) of every head / MLP whose output is exactly zero on every clean and corrupted
    prompt at every position (read from the model's activations, not from the plant's bookkeeping)."""
    L = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    zero = {("head", l, h) for l in range(L) for h in range(model.cfg.n_heads)}
    zero |= {("mlp_out", l, None) for l in range(L)}
    for corrupted in (False, True):
        b = batch_from_pairs(model, pairs, corrupted=corrupted)
        with torch.no_grad():
            _, cache = model.run_with_cache(b.tokens, names=names, attention_mask=b.mask, return_logits=False)
        for l in range(L):
            ho = head_outputs(model, l, cache[f"blocks.{l}.attn.hook_z"])  # [b, pos, H, d]
            for h in range(model.cfg.n_heads):
                if ho[:, :, h].abs().max() > 0:
                    zero.discard(("head", l, h))
            if cache[f"blocks.{l}.hook_mlp_out"].abs().max() > 0:
                zero.discard(("mlp_out", l, None))
    return zero


def _key(node_id: str):
    comp, layer, index, _, _ = parse_component_id(node_id)
    return comp, layer, index if comp == "head" else None


def _non_embed(ids):
    return [i for i in ids if parse_component_id(i)[0] not in ("embed", "logit")]


def _circuit_ids(res) -> list[str]:
    return [n.id for n in res.circuit.nodes if not n.id.startswith("logit/")]


def _matched_p(ev, circuit, n_samples=100, seed=0):
    """The matched baseline's p: H1's ``matched_random_baseline`` where it exists, else the same null computed
    here (embeddings forced, the rest drawn per (component, layer, role) stratum from the universe)."""
    if hasattr(ev, "matched_random_baseline"):
        return float(ev.matched_random_baseline(circuit, n_samples=n_samples, seed=seed).p_value)
    strat = lambda i: (parse_component_id(i)[0], parse_component_id(i)[1], parse_component_id(i)[3])  # noqa: E731
    forced = [i for i in circuit if i.startswith("embed/")]
    pool: dict = {}
    for u in ev.universe:
        if u not in forced:
            pool.setdefault(strat(u), []).append(u)
    need = Counter(strat(i) for i in circuit if i not in forced)
    rng = np.random.default_rng(seed)
    sets = [forced + [x for s, k in need.items() for x in rng.choice(pool[s], size=k, replace=False)]
            for _ in range(n_samples)]
    vals = np.asarray(ev.metric_of([list(circuit), ev.universe, []] + sets))
    f = np.asarray(curves.faithfulness(vals, vals[1], vals[2]), dtype=float)
    return float((1 + np.sum(f[3:] >= f[0] - 1e-9)) / (1 + n_samples))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def planted():
    model = _build_model()
    pairs = _pairs(model)
    _plant(model, pairs)
    return model, pairs


@pytest.fixture(scope="module")
def found(planted):
    model, pairs = planted
    return component_circuit(model, pairs, method="eap")


# ------------------------------------------------------------------------------------------------ the plant
def test_plant_is_what_it_claims(planted):
    """Only the planted components have a nonzero output, and the fact is clearly carried (gap >> 0)."""
    model, pairs = planted
    live = {("head", l, h) for l in range(model.cfg.n_layers) for h in range(N_HEADS)} | \
           {("mlp_out", l, None) for l in range(model.cfg.n_layers)}
    assert live - _zero_components(model, pairs) == {_key(i) for i in PLANTED}
    with torch.no_grad():
        gap = _gap(model, pairs)
    assert len(pairs) >= 6
    assert float(gap.min()) > 2.0 and float(gap.mean()) > 5.0, gap


# ------------------------------------------------------------------------------------------------ discovery
def test_discovery_finds_the_carriers_and_claims_no_zero_component(planted, found):
    model, pairs = planted
    claimed = set(_non_embed(_circuit_ids(found)))
    recall = len(PLANTED & claimed) / len(PLANTED)
    zero = _zero_components(model, pairs)
    precision = 1 - sum(_key(i) in zero for i in claimed) / max(1, len(claimed))
    assert recall >= 0.9, claimed
    assert precision == 1.0, claimed
    assert claimed == PLANTED  # the known answer exactly: nothing at positions that reach nothing


def test_discovery_after_mlp_knockout_drops_the_mlp(planted):
    """Knock out the planted MLP: the heads still carry the fact (direct path), and discovery must no longer
    claim the MLP, whose output is now zero."""
    model, pairs = planted
    with _knocked_out(model, mlps=MLPS):
        with torch.no_grad():
            assert float(_gap(model, pairs).abs().mean()) > 0.5
        claimed = set(_non_embed(_circuit_ids(component_circuit(model, pairs, method="eap"))))
        zero = _zero_components(model, pairs)
    assert ("mlp_out", 2, None) in zero
    assert claimed and not any(_key(i) in zero for i in claimed), claimed
    assert claimed <= PLANTED


# ------------------------------------------------------------------------------------------------ validation
def test_validation_passes_on_the_plant(planted, found):
    model, pairs = planted
    ev = CircuitEvaluator(model, pairs)
    C = _circuit_ids(found)
    assert ev.faithfulness(C) == pytest.approx(1.0, abs=0.05)
    if hasattr(ev, "faithfulness_with_ci"):
        r = ev.faithfulness_with_ci(C, n_boot=500)
        assert not r["degenerate"] and r["ci_low"] > 0.9
    rb = ev.random_baseline(C, n_samples=100)  # uniform: most draws lack a planted head
    assert rb.p_value < ALPHA
    # matched on (component, layer, role): the null keeps the MLP and draws 2 of 16 layer-0 heads at "last",
    # hitting both planted heads with probability 1/120; p ~ 0.02 is this plant's resolution, not a failure
    assert _matched_p(ev, C) < ALPHA


def test_validation_fails_without_the_carriers(planted, found):
    """The found circuit minus its carriers (embeddings only) explains nothing and beats no baseline."""
    model, pairs = planted
    ev = CircuitEvaluator(model, pairs)
    C = [i for i in _circuit_ids(found) if i not in PLANTED]
    assert abs(ev.faithfulness(C)) < 1e-6
    assert ev.random_baseline(C, n_samples=100).p_value >= ALPHA


@pytest.mark.parametrize("what", ["all", "heads"])
def test_validation_degenerate_when_carriers_are_knocked_out(planted, found, what):
    """Zero the planted heads (and MLP): clean and corrupted runs give the same metric, so faithfulness is
    undefined and must be reported as degenerate, never as a number."""
    model, pairs = planted
    C = _circuit_ids(found)
    mlps = MLPS if what == "all" else ()
    with _knocked_out(model, heads=HEADS, mlps=mlps):
        with torch.no_grad():
            assert float(_gap(model, pairs).abs().max()) < 1e-4
        ev = CircuitEvaluator(model, pairs)
        with pytest.raises(curves.DegenerateMetricError):
            ev.faithfulness(C)
        if hasattr(ev, "faithfulness_with_ci"):
            r = ev.faithfulness_with_ci(C, n_boot=200)
            assert r["degenerate"] and r["faithfulness"] is None


# ------------------------------------------------------------------------------------------------ pruning rule
@pytest.fixture(scope="module")
def planted_seed2():
    """Another random draw of the same plant, where the three carriers hold almost equal attribution (EAP node
    scores about 3.4, 3.2, 3.2) and the subject embeddings about 40% of the graph's influence."""
    model = _build_model(seed=2)
    pairs = _pairs(model)
    _plant(model, pairs)
    return model, pairs, component_circuit(model, pairs, method="eap", node_threshold=1.0)


def test_default_pruning_keeps_every_carrier(planted_seed2):
    """Fails when the node threshold is taken over every node, the always-kept embeddings included: with ~40% of the
    influence on the subject embeddings, the 0.8 cut then drops a carrier holding a third of the rest."""
    model, pairs, _ = planted_seed2
    claimed = set(_non_embed(_circuit_ids(component_circuit(model, pairs, method="eap"))))
    assert claimed == PLANTED


def test_threshold_over_non_forced_nodes_keeps_every_carrier(planted_seed2):
    """The same 0.8 share taken over the nodes pruning may drop (not the always-kept embeddings and logits)
    recovers the known answer exactly."""
    from circuit_discovery.graph.influence import compute_node_influence
    from circuit_discovery.graph.prune import find_threshold, prune_graph

    model, pairs, res = planted_seed2
    g = res.combined
    infl = compute_node_influence(g.adjacency, g.logit_weights())
    forced = g.kind_mask("embedding", "logit")
    thr = float(find_threshold(infl[~forced], 0.8))
    kept = prune_graph(g, node_threshold=1.0, min_node_influence=thr).node_mask
    claimed = set(_non_embed(g.nodes[i].id for i in kept.nonzero().flatten().tolist()))
    zero = _zero_components(model, pairs)
    assert claimed == PLANTED and not any(_key(i) in zero for i in claimed)
