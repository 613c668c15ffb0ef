"""CircuitEvaluator: references against independent runs, f(N)=1 / f(∅)=0, and a planted circuit recovered."""

import numpy as np
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution.component_graph import component_circuit
from circuit_discovery.errors import InputError
from circuit_discovery.facts import build_pairs, load_builtin
from circuit_discovery.metrics import batch_from_pairs, evaluate
from circuit_discovery.validation.ablation import CircuitEvaluator, parse_component_id
from circuit_discovery.validation.curves import faithfulness


def _pairs(model, n=4):
    pairs = [p for p in build_pairs(load_builtin()["capital_city"], model.tokenizer)
             if p.corruption == "subject_swap" and p.first_token_differs]
    return pairs[:n]


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-gemma3", device="cpu")


def test_parse_component_id():
    assert parse_component_id("head/L4/I2/last") == ("head", 4, 2, "last", None)
    assert parse_component_id("mlp_out/L3/P5") == ("mlp_out", 3, None, None, 5)
    assert parse_component_id("embed/L-1/subject_last") == ("embed", -1, None, "subject_last", None)
    for bad in ("mlp_out", "mlp_out/3/last", "mlp_out/L3/nowhere"):
        with pytest.raises(InputError):
            parse_component_id(bad)


@pytest.mark.parametrize("ablation", ["corrupted", "mean", "zero"])
@pytest.mark.parametrize("keyed_by", ["role", "position"])
def test_full_and_empty_circuits(model, ablation, keyed_by):
    pairs = _pairs(model)
    ev = CircuitEvaluator(model, pairs, ablation=ablation, keyed_by=keyed_by)
    mf, me = ev.references()
    clean = float(evaluate(model, batch_from_pairs(model, pairs)).double().mean())
    assert mf == pytest.approx(clean, abs=1e-5)  # nothing ablated = the clean run
    if ablation == "corrupted":
        # everything patched to the corrupted run = the corrupted prompt scored on the clean answers
        corr = float(evaluate(model, batch_from_pairs(model, pairs, corrupted=True)).double().mean())
        assert me == pytest.approx(corr, abs=1e-5)
    vals = ev.metric_of([ev.universe, []])
    assert faithfulness(vals[0], mf, me) == pytest.approx(1.0)
    assert faithfulness(vals[1], mf, me) == pytest.approx(0.0, abs=1e-9)
    curve = ev.curve(ev.universe[::-1])
    assert curve.faithfulness[-1] == pytest.approx(1.0)


def test_batched_equals_one_at_a_time(model):
    pairs = _pairs(model)
    ev = CircuitEvaluator(model, pairs, max_batch=8)  # forces several chunks
    rng = np.random.default_rng(0)
    sets = [[ev.universe[i] for i in rng.choice(len(ev.universe), 20, replace=False)] for _ in range(5)]
    together = ev.metric_of(sets)
    alone = [ev(s) for s in sets]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_faithfulness_per_prompt_equals_one_evaluator_per_prompt(model):
    """One batched per-prompt evaluation gives each prompt's own faithfulness (a one-prompt evaluator's)."""
    pairs = _pairs(model)
    ev = CircuitEvaluator(model, pairs)
    rng = np.random.default_rng(1)
    circuit = [ev.universe[i] for i in rng.choice(len(ev.universe), 30, replace=False)]
    per = ev.faithfulness_per_prompt(circuit)
    assert len(per) == len(pairs)
    for p, f in zip(pairs, per):
        one = CircuitEvaluator(model, [p])
        assert f == pytest.approx(one.faithfulness([i for i in circuit if i in set(one.universe)]), abs=1e-6)
    assert ev.metric_per_prompt([circuit]).mean(1).item() == pytest.approx(ev.metric_of([circuit])[0])


def test_single_node_patch_matches_manual_patch(model):
    """Ablating only one MLP at the subject_last role = patching that hook at those positions by hand."""
    pairs = _pairs(model, n=1)
    ev = CircuitEvaluator(model, pairs)
    target = "mlp_out/L1/subject_last"
    value = ev([i for i in ev.universe if i != target])
    b, cb = batch_from_pairs(model, pairs), batch_from_pairs(model, pairs, corrupted=True)
    _, cache = model.run_with_cache(cb.tokens, names=["blocks.1.hook_mlp_out"], return_logits=False)
    pos = pairs[0].role_positions("subject_last")

    def patch(x, name):
        y = x.clone()
        y[:, pos] = cache[name][:, pos]
        return y
    with model.hooks([("blocks.1.hook_mlp_out", patch)]):
        manual = float(evaluate(model, b).mean())
    assert value == pytest.approx(manual, abs=1e-5)


def test_bad_nodes(model):
    ev = CircuitEvaluator(model, _pairs(model, 2), granularity="head")
    with pytest.raises(InputError):
        ev(["attn_out/L1/last"])  # wrong granularity
    with pytest.raises(InputError):
        ev(["head/L9/I0/last"])
    with pytest.raises(InputError):
        ev(["neuron/L1/I3/last"])
    with pytest.raises(InputError):
        CircuitEvaluator(model, _pairs(model, 2), ablation="resample")
    assert ev(["logit/L4/last"]) == pytest.approx(ev([]))  # logit nodes are ignored


def test_planted_circuit_recovered():
    """Only head (L1, H2) and the MLP of layer 0 write to the residual: EAP + pruning finds them, f ~ 1."""
    m = load_model("tiny-llama", device="cpu")
    cfg = m.cfg
    keep_layer, keep_head, mlp_layer = 1, 2, 0
    with torch.no_grad():
        for l, layer in enumerate(m.hf_model.model.layers):
            W = layer.self_attn.o_proj.weight  # [d_model, n_heads * d_head]
            for h in range(cfg.n_heads):
                if (l, h) != (keep_layer, keep_head):
                    W[:, h * cfg.d_head:(h + 1) * cfg.d_head] = 0
            if l != mlp_layer:
                layer.mlp.down_proj.weight.zero_()
    pairs = _pairs(m, n=4)
    res = component_circuit(m, pairs, method="eap", node_threshold=0.95, edge_threshold=0.99)
    comps = {(n.component, n.layer, n.index) for n in res.circuit.nodes if n.component not in ("embed", "logit")}
    assert comps <= {("head", keep_layer, keep_head), ("mlp_out", mlp_layer, None)}
    assert ("head", keep_layer, keep_head) in comps
    ev = CircuitEvaluator(m, pairs)
    f = ev.faithfulness(res.circuit.node_ids)
    assert f == pytest.approx(1.0, abs=0.1)
    # a random circuit of the same size does worse on average, and the curve reaches 1 once the planted nodes are in
    rb = ev.random_baseline(res.circuit.node_ids, n_samples=20, seed=0)
    assert rb.observed > np.mean(rb.null_faithfulness)
    curve = ev.curve(res.ranked_nodes())
    assert curve.faithfulness[-1] == pytest.approx(1.0)
    mn = ev.minimality([i for i in res.circuit.node_ids if not i.startswith("logit")])
    assert len(mn.effects) == len([i for i in res.circuit.node_ids if not i.startswith("logit")])
