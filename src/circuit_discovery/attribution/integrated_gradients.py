"""Integrated gradients, batched, with Captum's argument names and quadrature.

``IG_i(x) = (x_i - x'_i) * integral_0^1 d f(x' + a (x - x')) / d x_i  da``, approximated by ``sum_k w_k g(a_k)``
with the points ``a_k`` and weights ``w_k`` of ``method`` -- exactly Captum's
(``captum.attr._utils.approximation_methods``): ``riemann_left``/``riemann_right``/``riemann_middle``
(weights 1/n), ``riemann_trapezoid`` (points ``linspace(0, 1, n)``, weights 1/n with both ends halved, as in
Captum), ``gausslegendre`` (``numpy.polynomial.legendre.leggauss`` mapped to [0, 1]). Riemann points come from a
float32 ``torch.linspace`` as in Captum.

Two variants on a model (EAP-IG, Hanna et al. 2024):

* ``"activations"``: the straight path from the corrupted to the clean activation at one hook. The forward for
  each step starts at the hook's layer from the cached clean ``resid_pre`` (:meth:`HookedModel.start_at_layer`);
  the layers below are not rerun. Everything except the hook comes from the clean prompt, as in Captum's
  ``LayerIntegratedGradients(inputs=clean, baselines=corrupted)``.
* ``"inputs"``: the same path on the input embeddings (``hook_embed``), a full forward per step.

The convergence delta is ``sum(attributions) - (m(clean) - m(corrupted))`` per prompt (Captum's definition).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.attribution.inputs import (
    PairInputs,
    as_inputs,
    cached_run,
    metric_name,
    parse_hook,
    reduce_to_nodes,
    select,
)
from circuit_discovery.attribution.scores import Scores
from circuit_discovery.errors import InputError
from circuit_discovery.metrics import get_metric
from circuit_discovery.models.hooked import frozen

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def approximation_parameters(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """(step sizes, alphas) of ``method`` for ``n_steps`` points, as Captum computes them."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise InputError(f"n_steps must be a positive int, got {n_steps!r}")
    n = n_steps
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return list(0.5 * w), list(0.5 * (1 + x))
    if n < 2:
        raise InputError(f"{method} needs n_steps >= 2 (Captum asserts the same)")
    steps = [1 / n] * n
    if method == "riemann_trapezoid":
        steps[0] /= 2
        steps[-1] /= 2
        alphas = torch.linspace(0, 1, n).tolist()
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n).tolist()
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    else:
        alphas = torch.linspace(1 / n, 1, n).tolist()
    return steps, alphas


def _integrate(fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, baselines: Tensor, n_steps: int,
               method: str, internal_batch_size: int | None) -> Tensor:
    """``(x - x') * sum_k w_k grad f(x' + a_k (x - x'))`` for rows of ``inputs`` [batch, ...].

    ``fn(points [rows, ...], example [rows]) -> [rows]`` evaluates the function for each row (``example`` tells
    which input row the point belongs to); rows are (step, example) pairs, ``internal_batch_size`` per call.
    """
    if inputs.shape != baselines.shape:
        raise InputError(f"inputs {tuple(inputs.shape)} and baselines {tuple(baselines.shape)} differ in shape")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise InputError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
    steps, alphas = approximation_parameters(method, n_steps)
    b = inputs.shape[0]
    diff = (inputs - baselines).detach()
    base = baselines.detach()
    shape = (-1,) + (1,) * (inputs.ndim - 1)
    a_all = torch.tensor(alphas, dtype=inputs.dtype, device=inputs.device).repeat_interleave(b)  # step-major
    w_all = torch.tensor(steps, dtype=torch.float64, device=inputs.device).repeat_interleave(b)
    ex_all = torch.arange(b, device=inputs.device).repeat(len(alphas))
    total = torch.zeros(inputs.shape, dtype=torch.float64, device=inputs.device)
    chunk = internal_batch_size or len(a_all)
    for c in range(0, len(a_all), chunk):
        a, w, ex = a_all[c:c + chunk], w_all[c:c + chunk], ex_all[c:c + chunk]
        x = (base[ex] + a.view(shape) * diff[ex]).requires_grad_(True)
        with torch.enable_grad():
            out = fn(x, ex)
            if out.shape != (len(ex),):
                raise InputError(f"the function must return one value per row [{len(ex)}], got {tuple(out.shape)}")
            (g,) = torch.autograd.grad(out.sum(), x)
        total.index_add_(0, ex, g.double() * w.view(shape))
    return diff.double() * total


def integrated_gradients_fn(fn: Callable[[Tensor], Tensor], inputs: Tensor, baselines: Tensor | None = None, *,
                            n_steps: int = 50, method: str = "gausslegendre", internal_batch_size: int | None = None,
                            return_convergence_delta: bool = False):
    """IG of a row-wise function ``fn(x [rows, ...]) -> [rows]`` at ``inputs`` [batch, ...] (baselines: zeros).

    Returns attributions [batch, ...] (float64), and with ``return_convergence_delta`` also
    ``sum(attributions) - (fn(inputs) - fn(baselines))`` [batch].
    """
    baselines = torch.zeros_like(inputs) if baselines is None else baselines
    attr = _integrate(lambda x, ex: fn(x), inputs, baselines, n_steps, method, internal_batch_size)
    if not return_convergence_delta:
        return attr
    with torch.no_grad():
        d = fn(inputs).double() - fn(baselines).double()
    return attr, attr.reshape(attr.shape[0], -1).sum(1) - d


def layer_integrated_gradients(model, pairs, hook_name: str, *, n_steps: int = 50, method: str = "gausslegendre",
                               internal_batch_size: int | None = None, return_convergence_delta: bool = False,
                               metric="logit_diff", noise_scale: float = 3.0, seed: int = 0):
    """IG of ``metric`` w.r.t. the activation at ``hook_name`` along corrupted -> clean.

    Returns attributions shaped like the activation ([batch, pos, d_model], ``[batch, pos, head, d_head]`` for
    ``attn.hook_z``, ...; float64), and with ``return_convergence_delta`` also the delta [batch]. ``hook_embed``
    is the "inputs" variant (full forward per step); every other hook the "activations" variant (start at the
    hook's layer from the cached clean ``resid_pre``).
    """
    inputs = as_inputs(model, pairs, noise_scale=noise_scale, seed=seed)
    attr, m_clean, m_corr = _layer_ig(model, inputs, hook_name, n_steps, method, internal_batch_size, metric)
    if not return_convergence_delta:
        return attr
    return attr, attr.reshape(attr.shape[0], -1).sum(1).cpu() - (m_clean - m_corr).double().cpu()


def _layer_ig(model, inputs: PairInputs, hook_name: str, n_steps: int, method: str,
              internal_batch_size: int | None, metric) -> tuple[Tensor, Tensor, Tensor]:
    model.check_hook_name(hook_name)
    comp, layer = parse_hook(hook_name)
    mfn = get_metric(metric)
    names = [hook_name] + ([f"blocks.{layer}.hook_resid_pre"] if layer >= 0 else [])
    m_clean, clean_cache = cached_run(model, inputs, "clean", names, metric)
    m_corr, corr_cache = cached_run(model, inputs, "corrupted", [hook_name], metric)
    x1, x0 = clean_cache[hook_name], corr_cache[hook_name]
    toks, mask = inputs.clean.tokens, inputs.clean.mask

    def fn(x: Tensor, ex: Tensor) -> Tensor:
        batch = select(inputs.clean, ex)
        if comp == "resid_pre":
            with model.start_at_layer(layer, x):
                h = model.final_hidden(toks[ex], mask[ex])
        elif layer < 0:
            with model.hooks([(hook_name, lambda a, n: x)]):
                h = model.final_hidden(toks[ex], mask[ex])
        else:
            start = clean_cache[f"blocks.{layer}.hook_resid_pre"][ex]
            with model.start_at_layer(layer, start), model.hooks([(hook_name, lambda a, n: x)]):
                h = model.final_hidden(toks[ex], mask[ex])
        return mfn(model, h, batch)

    with frozen(model):
        attr = _integrate(fn, x1, x0, n_steps, method, internal_batch_size)
    return attr, m_clean, m_corr


def integrated_gradients(model, pairs, hook_name: str | None = None, *, variant: str | None = None,
                         n_steps: int = 50, method: str = "gausslegendre", internal_batch_size: int | None = None,
                         return_convergence_delta: bool = False, metric="logit_diff", head_positions: bool = True,
                         noise_scale: float = 3.0, seed: int = 0):
    """IG scores per node of one hook -> :class:`Scores` (and the convergence delta [batch] when asked).

    ``variant="inputs"`` attributes to ``hook_embed``; ``"activations"`` (default) to ``hook_name`` (default
    ``blocks.{n_layers // 2}.hook_resid_pre``). Nodes: (layer, position) summed over d_model; (layer, position,
    head) for ``attn.hook_z``; (layer, position, neuron) for ``mlp.hook_post``.
    """
    if variant not in (None, "activations", "inputs"):
        raise InputError(f"variant must be 'activations' or 'inputs', got {variant!r}")
    if variant == "inputs":
        if hook_name not in (None, "hook_embed"):
            raise InputError("the 'inputs' variant attributes to hook_embed; drop hook_name or use 'activations'")
        hook_name = "hook_embed"
    hook_name = hook_name or f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"
    inputs = as_inputs(model, pairs, noise_scale=noise_scale, seed=seed)
    attr, m_clean, m_corr = _layer_ig(model, inputs, hook_name, n_steps, method, internal_batch_size, metric)
    delta = attr.reshape(attr.shape[0], -1).sum(1).cpu() - (m_clean - m_corr).double().cpu()
    comp, layer = parse_hook(hook_name)
    nodes, vals = reduce_to_nodes(attr, comp, layer, inputs.lengths, head_positions=head_positions)
    scores = Scores(nodes=nodes, values=vals.cpu(), tokens=inputs.tokens, roles=inputs.roles, clean_metric=m_clean,
                    corrupted_metric=m_corr, method="integrated_gradients", metric=metric_name(metric),
                    meta={"hook": hook_name, "variant": "inputs" if comp == "embed" else "activations",
                          "n_steps": n_steps, "method": method, "convergence_delta": delta.tolist()})
    return (scores, delta) if return_convergence_delta else scores
