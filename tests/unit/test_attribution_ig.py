"""Integrated gradients: Captum's quadrature, exactness on closed forms, agreement with Captum on tiny models."""
import numpy as np
import pytest
import torch

from circuit_discovery.attribution import (PairInputs, approximation_parameters, integrated_gradients,
                                           integrated_gradients_fn, layer_integrated_gradients)
from circuit_discovery.errors import InputError





METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 5, 64])
def test_quadrature_is_captums(method, n):
    from captum.attr._utils.approximation_methods import approximation_parameters as captum_params

    steps_fn, alphas_fn = captum_params(method)
    steps, alphas = approximation_parameters(method, n)
    assert list(map(float, steps)) == list(map(float, steps_fn(n)))
    assert list(map(float, alphas)) == list(map(float, alphas_fn(n)))


def _quadratic():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return A, b, x, x0


def test_linear_exact_all_methods():
    _, w, x, x0 = _quadratic()
    f = lambda z: z @ w  # noqa: E731
    exact = (x - x0) * w
    for method in METHODS:
        attr = integrated_gradients_fn(f, x, x0, n_steps=7, method=method)
        scale = sum(approximation_parameters(method, 7)[0])  # Captum's trapezoid weights sum to (n-1)/n
        torch.testing.assert_close(attr, exact * scale, rtol=1e-12, atol=1e-12)


def test_quadratic_closed_form():
    A, b, x, x0 = _quadratic()
    f = lambda z: torch.einsum("ni,ij,nj->n", z, A, z) + z @ b  # noqa: E731
    d = x - x0
    S = A + A.T
    # grad at x0 + a d is g0 + a g1 (linear in a): IG_i = d_i (g0_i + g1_i / 2) exactly
    g0, g1 = x0 @ S + b, d @ S
    exact = d * (g0 + 0.5 * g1)
    # Gauss-Legendre points are float64 (exact to rounding); Captum's Riemann points come from a float32
    # linspace, so the midpoint rule is exact only to float32 resolution of its points
    for method, tol in (("gausslegendre", 1e-12), ("riemann_middle", 1e-6)):
        attr, delta = integrated_gradients_fn(f, x, x0, n_steps=3, method=method, return_convergence_delta=True)
        torch.testing.assert_close(attr, exact, rtol=tol, atol=tol)
        assert delta.abs().max() < tol * 10  # completeness
    n = 6
    for method, mean_alpha in (("riemann_left", (n - 1) / (2 * n)), ("riemann_right", (n + 1) / (2 * n))):
        attr = integrated_gradients_fn(f, x, x0, n_steps=n, method=method)
        torch.testing.assert_close(attr, d * (g0 + mean_alpha * g1), rtol=1e-6, atol=1e-9)


def test_internal_batch_size_does_not_change_result():
    A, b, x, x0 = _quadratic()
    f = lambda z: torch.tanh(z @ A).sum(1)  # noqa: E731
    full = integrated_gradients_fn(f, x, x0, n_steps=10)
    for ibs in (1, 4, 7):
        torch.testing.assert_close(integrated_gradients_fn(f, x, x0, n_steps=10, internal_batch_size=ibs), full)


def test_bad_arguments():
    _, _, x, x0 = _quadratic()
    with pytest.raises(InputError, match="unknown method"):
        integrated_gradients_fn(lambda z: z.sum(1), x, x0, method="simpson")
    with pytest.raises(InputError, match="n_steps"):
        integrated_gradients_fn(lambda z: z.sum(1), x, x0, n_steps=0)
    with pytest.raises(InputError, match="shape"):
        integrated_gradients_fn(lambda z: z.sum(1), x, x0[:2])


def _inputs(model):
    c = [model.to_tokens(t)[0].tolist() for t in ("The capital of France is", "The capital of Japan is")]
    k = [model.to_tokens(t)[0].tolist() for t in ("The capital of Italy is", "The capital of Spain is")]
    n = min(map(len, c + k))
    return PairInputs.from_tokens(model, [x[:n] for x in c], [x[:n] for x in k], [[5], [7]], [[9], [11]])


def _captum_forward(model, inputs):
    hf = model.hf_model
    a, cf = inputs.clean.answer_first, inputs.clean.cf_first

    def forward(ids, a, cf):
        logits = hf(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]
        r = torch.arange(ids.shape[0])
        return logits[r, a] - logits[r, cf]

    return forward, (a, cf)


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama", "tiny-gemma2"])
@pytest.mark.parametrize("where", ["resid_pre", "attn_out", "embed"])
def test_agrees_with_captum_layer_ig(tiny_models, name, where):
    from captum.attr import LayerIntegratedGradients

    from circuit_discovery.models.arch import get_module

    m = tiny_models[name]
    if where == "attn_out" and name == "tiny-llama":
        pytest.skip("LLaMA's attention module returns a tuple (output, weights): Captum attributes to both")
    inputs = _inputs(m)
    L = m.cfg.n_layers // 2
    layer = m._layers[L]
    if where == "resid_pre":
        module, hook, to_input = layer, f"blocks.{L}.hook_resid_pre", True
    elif where == "attn_out":
        module, hook, to_input = get_module(layer, m.spec.attn_out), f"blocks.{L}.hook_attn_out", False
    else:
        module, hook, to_input = get_module(m.hf_model, m.spec.embed), "hook_embed", False
    fwd, extra = _captum_forward(m, inputs)
    for method in ("gausslegendre", "riemann_trapezoid"):
        ref, ref_delta = LayerIntegratedGradients(fwd, module).attribute(
            inputs=inputs.clean.tokens, baselines=inputs.corrupted.tokens, additional_forward_args=extra,
            n_steps=9, method=method, internal_batch_size=6, attribute_to_layer_input=to_input,
            return_convergence_delta=True)
        ours, delta = layer_integrated_gradients(m, inputs, hook, n_steps=9, method=method, internal_batch_size=5,
                                                 return_convergence_delta=True)
        if isinstance(ref, tuple):
            ref = ref[0]
        err = ((ours - ref.double()).abs().max() / ref.abs().max()).item()
        assert err <= 1e-4, (name, where, method, err)
        torch.testing.assert_close(delta, ref_delta.double().reshape(-1), rtol=1e-3, atol=1e-4)


def test_completeness_and_scores_on_tiny(tiny_models):
    m = tiny_models["tiny-gemma3"]
    inputs = _inputs(m)
    scores, delta = integrated_gradients(m, inputs, "blocks.2.hook_resid_pre", n_steps=32,
                                         return_convergence_delta=True)
    diff = scores.clean_metric - scores.corrupted_metric
    assert (delta.abs() <= 1e-3 * diff.abs()).all()
    torch.testing.assert_close(torch.nansum(scores.values, 1), diff + delta, rtol=1e-6, atol=1e-6)
    assert {n.component for n in scores.nodes} == {"resid_pre"}
    # inputs variant: nodes on the embedding; heads: per (position, head)
    s_in = integrated_gradients(m, inputs, variant="inputs", n_steps=8)
    assert s_in.nodes[0].component == "embed" and s_in.meta["variant"] == "inputs"
    s_z = integrated_gradients(m, inputs, "blocks.1.attn.hook_z", n_steps=8)
    assert len(s_z.nodes) == inputs.clean.tokens.shape[1] * m.cfg.n_heads
    with pytest.raises(InputError):
        integrated_gradients(m, inputs, "blocks.1.hook_resid_pre", variant="inputs")


def test_captum_quadrature_numbers_are_numpy_leggauss():
    steps, alphas = approximation_parameters("gausslegendre", 4)
    x, w = np.polynomial.legendre.leggauss(4)
    np.testing.assert_allclose(steps, w / 2)
    np.testing.assert_allclose(alphas, (x + 1) / 2)
