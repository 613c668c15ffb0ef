"""Exact activation patching and attribution patching on tiny float64 models, against brute-force oracles
(plain hooked forwards of the full model, one patch at a time, full-vocabulary logits)."""
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution import (Node, PairInputs, Patch, activation_patching, attribution_patching,
                                           patch_runs)
from circuit_discovery.errors import InputError
from circuit_discovery.facts import Fact, build_pairs





SUBJECTS = [("France", " Paris"), ("Germany", " Berlin"), ("Italy", " Rome"), ("Japan", " Tokyo")]


@pytest.fixture(scope="module")
def m64():
    return load_model("tiny-gemma3", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def pairs(m64):
    facts = [Fact("capital", s, f"The capital of {s} is", a, template="The capital of {} is") for s, a in SUBJECTS]
    return build_pairs(facts, m64.tokenizer)


def _ld(model, tokens, pair_list, hooks=()):
    """Oracle metric: full logits of a plain forward, answer minus counterfactual at the last position."""
    with torch.no_grad(), model.hooks(list(hooks)):
        logits = model(tokens)[:, -1]
    a = torch.tensor([p.answer_tokens[0] for p in pair_list])
    c = torch.tensor([p.counterfactual_tokens[0] for p in pair_list])
    r = torch.arange(len(pair_list))
    return logits[r, a] - logits[r, c]


def _cache(model, tokens, name):
    _, cache = model.run_with_cache(tokens, names=[name])
    return cache[name]


def _oracle_patch(model, pair, node, direction, window=1):
    clean = torch.tensor([pair.clean_tokens])
    corr = torch.tensor([pair.corrupted_tokens])
    base, src = (corr, clean) if direction == "denoising" else (clean, corr)
    hooks = []
    for l in range(node.layer, node.layer + window):
        name = Node(node.component, l).hook_name
        s = _cache(model, src, name)

        def fn(x, _n, s=s):
            x = x.clone()
            if node.component == "head":
                sl = slice(None) if node.position is None else node.position
                x[:, sl, node.index] = s[:, sl, node.index]
            elif node.position is None:
                x[:] = s
            else:
                x[:, node.position] = s[:, node.position]
            return x

        hooks.append((name, fn))
    return (_ld(model, base, [pair], hooks) - _ld(model, base, [pair]))[0].item()


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_definitions_against_brute_force(m64, pairs, direction):
    comps = ("resid_pre", "attn_out", "mlp_out", "resid_post")
    s = activation_patching(m64, pairs[:2], comps, direction=direction)
    torch.testing.assert_close(s.clean_metric, _ld(m64, torch.tensor([p.clean_tokens for p in pairs[:2]]),
                                                   pairs[:2]))
    for j, node in enumerate(s.nodes[::5]):
        for b in range(2):
            got = s.values[b, s.nodes.index(node)].item()
            assert got == pytest.approx(_oracle_patch(m64, pairs[b], node, direction), abs=1e-10), node


def test_heads_and_windows_against_brute_force(m64, pairs):
    s = activation_patching(m64, pairs[:1], ("head",), layers=[1, 2])
    for node in s.nodes:
        assert s[node][0].item() == pytest.approx(_oracle_patch(m64, pairs[0], node, "denoising"), abs=1e-10)
    s = activation_patching(m64, pairs[:1], ("head",), layers=[2], head_positions=True, positions=[3, 4])
    for node in s.nodes:
        assert s[node][0].item() == pytest.approx(_oracle_patch(m64, pairs[0], node, "denoising"), abs=1e-10)
    s = activation_patching(m64, pairs[:1], ("mlp_out",), layers=[0, 1], window=2, positions=[4, 5])
    for node in s.nodes:
        want = _oracle_patch(m64, pairs[0], node, "denoising", window=2)
        assert s[node][0].item() == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_patching_every_position_reproduces_the_other_run(m64, pairs, direction):
    s = activation_patching(m64, pairs, ("resid_pre",), direction=direction, positions="all")
    target = s.clean_metric if direction == "denoising" else s.corrupted_metric
    base = s.corrupted_metric if direction == "denoising" else s.clean_metric
    for j in range(len(s.nodes)):
        torch.testing.assert_close(s.values[:, j] + base, target, rtol=0, atol=1e-12)
    # normalised denoising reads exactly 1
    if direction == "denoising":
        n = activation_patching(m64, pairs, ("resid_pre",), positions="all", normalize=True)
        torch.testing.assert_close(n.values, torch.ones_like(n.values), rtol=0, atol=1e-10)


def test_self_patching_changes_nothing(m64, pairs):
    toks = [list(p.clean_tokens) for p in pairs]
    inputs = PairInputs.from_tokens(m64, toks, toks, [p.answer_tokens for p in pairs],
                                    [p.counterfactual_tokens for p in pairs])
    for direction in ("denoising", "noising"):
        s = activation_patching(m64, inputs, ("resid_pre", "attn_out", "mlp_out", "head"), direction=direction)
        assert s.values.abs().max().item() == 0.0


def test_batched_equals_one_at_a_time(m64, pairs):
    comps = ("resid_pre", "mlp_out", "head")
    a = activation_patching(m64, pairs, comps, batch_size=512)
    b = activation_patching(m64, pairs, comps, batch_size=1)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-12)
    one = activation_patching(m64, pairs[2:3], comps)
    torch.testing.assert_close(a.values[2:3], one.values, rtol=0, atol=1e-12)


def test_float32_batched_matches_float64(pairs, tiny_models):
    m32 = tiny_models["tiny-gemma3"]
    a = activation_patching(m32, pairs, ("resid_pre", "attn_out"), batch_size=7)
    m64 = load_model("tiny-gemma3", device="cpu", dtype="float64")
    b = activation_patching(m64, pairs, ("resid_pre", "attn_out"))
    torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-4)


def test_noise_pairs_are_seeded(m64, pairs):
    from dataclasses import replace

    noisy = [replace(p, corrupted_tokens=p.clean_tokens, corruption="noise") for p in pairs[:2]]
    a = activation_patching(m64, noisy, ("resid_pre",), seed=3)
    b = activation_patching(m64, noisy, ("resid_pre",), seed=3)
    torch.testing.assert_close(a.values, b.values)
    assert not torch.equal(a.clean_metric, a.corrupted_metric)
    # restoring every position of the first resid_pre restores the clean run exactly
    c = activation_patching(m64, noisy, ("resid_pre",), layers=[0], positions="all", seed=3)
    torch.testing.assert_close(c.values[:, 0] + c.corrupted_metric, c.clean_metric, atol=1e-12, rtol=0)


def test_attribution_patching_is_the_first_order_term(pairs):
    """AP equals the directional derivative of the metric along (a_clean - a_corr), by central differences.

    GPT-2 in float64 (Gemma/LLaMA norms compute in float32, too coarse for finite differences)."""
    m64 = load_model("tiny-gpt2", device="cpu", dtype="float64")
    comps = ("resid_pre", "attn_out", "mlp_out", "head")
    s = attribution_patching(m64, pairs[:2], comps)
    eps = 1e-5
    for node in [Node("resid_pre", 1, 4), Node("attn_out", 2, 5), Node("mlp_out", 0, 4), Node("head", 2, None, 1)]:
        for b in range(2):
            pair = pairs[b]
            clean, corr = torch.tensor([pair.clean_tokens]), torch.tensor([pair.corrupted_tokens])
            name = node.hook_name
            d = _cache(m64, clean, name) - _cache(m64, corr, name)

            def fn(x, _n, d=d, e=1.0):
                x = x.clone()
                if node.component == "head":
                    x[:, :, node.index] += e * eps * d[:, :, node.index]
                else:
                    x[:, node.position] += e * eps * d[:, node.position]
                return x

            up = _ld(m64, corr, [pair], [(name, fn)])
            down = _ld(m64, corr, [pair], [(name, lambda x, n, fn=fn: fn(x, n, e=-1.0))])
            fd = ((up - down) / (2 * eps))[0].item()
            assert s[node][b].item() == pytest.approx(fd, rel=1e-6, abs=1e-8), node
    # noising: the derivative at the clean run along (a_corr - a_clean)
    n = attribution_patching(m64, pairs[:1], ("resid_pre",), direction="noising", layers=[1])
    pair = pairs[0]
    clean, corr = torch.tensor([pair.clean_tokens]), torch.tensor([pair.corrupted_tokens])
    name = "blocks.1.hook_resid_pre"
    d = _cache(m64, corr, name) - _cache(m64, clean, name)

    def shift(e):
        def fn(x, _n):
            x = x.clone()
            x[:, 4] += e * d[:, 4]
            return x
        return fn

    fd = ((_ld(m64, clean, [pair], [(name, shift(eps))]) - _ld(m64, clean, [pair], [(name, shift(-eps))]))
          / (2 * eps))[0].item()
    assert n[Node("resid_pre", 1, 4)][0].item() == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_patch_runs_and_errors(m64, pairs):
    inputs = PairInputs.from_pairs(m64, pairs)
    out = patch_runs(m64, inputs, [(0, [Patch("blocks.0.hook_resid_pre", None)])])
    assert out[0].item() == pytest.approx(_ld(m64, torch.tensor([pairs[0].clean_tokens]), pairs[:1])[0].item())
    with pytest.raises(InputError, match="direction"):
        activation_patching(m64, pairs, direction="sideways")
    with pytest.raises(InputError, match="cannot patch"):
        activation_patching(m64, pairs, ("logit",))
    with pytest.raises(InputError, match="positions"):
        activation_patching(m64, pairs, positions=[99])
    with pytest.raises(InputError, match="window"):
        activation_patching(m64, pairs, window=0)
    with pytest.raises(InputError, match="no fact pairs"):
        activation_patching(m64, [])
    with pytest.raises(InputError, match="does not support"):
        attribution_patching(m64, pairs, ("logit",))


def test_causal_tracing_roles_restriction_matches_full_trace(tiny_models):
    """Restricting to one role gives exactly the full trace's values there, and NaN elsewhere."""
    import numpy as np

    from circuit_discovery.attribution.causal_tracing import causal_tracing
    from circuit_discovery.facts import build_pairs, load_builtin

    m = tiny_models["tiny-gemma3"]
    pairs = build_pairs(load_builtin()["capital_city"][:2], m.tokenizer, seed=0)
    full = causal_tracing(m, pairs, kinds=("mlp",), n_samples=2, seed=3).scores.per_prompt_array("mlp_out")
    part = causal_tracing(m, pairs, kinds=("mlp",), n_samples=2, seed=3,
                          roles=["subject_last"]).scores.per_prompt_array("mlp_out")
    for i, p in enumerate(pairs):
        s = p.subject_span[1] - 1
        assert np.allclose(part[i][:, s], full[i][:, s], atol=1e-6)
        others = [j for j in range(len(p.clean_tokens)) if j != s]
        assert np.isnan(part[i][:, others]).all()
