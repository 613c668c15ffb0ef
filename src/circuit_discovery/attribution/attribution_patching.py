"""Attribution patching (Nanda 2023; node-level edge attribution patching, Syed et al. 2023).

The first-order Taylor estimate of every node's patching effect from one clean forward, one corrupted forward
and one backward pass::

    denoising:  m(corrupted, a <- a_clean) - m(corrupted)  ~=  (a_clean - a_corr) . dm/da |corrupted
    noising:    m(clean, a <- a_corr)      - m(clean)      ~=  (a_corr - a_clean) . dm/da |clean

The gradient is taken with respect to an additive zero at each hook, so every hook's gradient is the partial
derivative at that point of the computation (the same quantity exact patching of that hook alone changes).
Scores use the same nodes and sign conventions as :func:`~circuit_discovery.attribution.activation_patching`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from circuit_discovery.attribution.inputs import (
    POSITIONAL,
    as_inputs,
    cached_run,
    check_direction,
    hook_for,
    metric_name,
    noise_hook,
    reduce_to_nodes,
)
from circuit_discovery.attribution.scores import Scores
from circuit_discovery.errors import InputError
from circuit_discovery.metrics import get_metric
from circuit_discovery.models.hooked import frozen

AP_COMPONENTS = POSITIONAL + ("head", "neuron", "embed")


def attribution_patching(model, pairs, components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"), *,
                         direction: str = "denoising", metric="logit_diff", layers: Sequence[int] | None = None,
                         head_positions: bool = False, normalize: bool = False, noise_scale: float = 3.0,
                         seed: int = 0) -> Scores:
    """Linear estimate of the patching effect of every node of ``components`` x ``layers`` -> :class:`Scores`.

    Components: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (per (layer, position)),
    ``head`` (per (layer, head), or per (layer, position, head) with ``head_positions``), ``neuron`` (per
    (layer, position, neuron) of ``mlp.hook_post``) and ``embed`` (per position).
    """
    check_direction(direction)
    bad = [c for c in components if c not in AP_COMPONENTS]
    if bad:
        raise InputError(f"attribution patching does not support {bad}; choose from {', '.join(AP_COMPONENTS)}")
    inputs = as_inputs(model, pairs, noise_scale=noise_scale, seed=seed)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    targets: list[tuple[str, int, str]] = []  # (component, layer, hook)
    for comp in components:
        if comp == "embed":
            targets.append(("embed", -1, "hook_embed"))
        else:
            targets += [(comp, l, hook_for(comp, l)) for l in layers]
    names = list(dict.fromkeys(t[2] for t in targets))
    base_which, src_which = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    m_src, src_cache = cached_run(model, inputs, src_which, names, metric)

    base_batch = inputs.corrupted if direction == "denoising" else inputs.clean
    acts: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def grab(x, name):
        acts[name] = x.detach()
        z = torch.zeros_like(x, requires_grad=True)
        zeros[name] = z
        return x + z

    hooks = (noise_hook(inputs.noise) if base_which == "corrupted" else []) + [(n, grab) for n in names]
    with frozen(model), torch.enable_grad(), model.hooks(hooks):
        h = model.final_hidden(base_batch.tokens, base_batch.mask)
        m_base = get_metric(metric)(model, h, inputs.clean)
        grads = torch.autograd.grad(m_base.sum(), [zeros[n] for n in names], allow_unused=True)
    grad = {n: (g if g is not None else torch.zeros_like(zeros[n])) for n, g in zip(names, grads)}
    lengths = inputs.lengths
    all_nodes, cols = [], []
    for comp, l, name in targets:
        est = (src_cache[name] - acts[name]).double() * grad[name].double()
        nodes, vals = reduce_to_nodes(est, comp, l, lengths, head_positions=head_positions)
        all_nodes += nodes
        cols.append(vals.cpu())
    values = torch.cat(cols, dim=1)
    m_base = m_base.detach()
    clean_m, corr_m = (m_src, m_base) if direction == "denoising" else (m_base, m_src)
    scores = Scores(nodes=all_nodes, values=values, tokens=inputs.tokens, roles=inputs.roles, clean_metric=clean_m,
                    corrupted_metric=corr_m, method=f"attribution_patching_{direction}", metric=metric_name(metric),
                    meta={"direction": direction})
    return scores.normalized() if normalize else scores
