"""Component attribution graphs scored by edge attribution patching (EAP) and EAP-IG.

Nodes (per prompt, every position ``p`` of the prompt):

* ``embed`` (``Node("embed", -1, p)``): the token embedding (``hook_embed``);
* attention: heads ``Node("head", l, p, h)`` (``granularity="head"``) or whole layers
  ``Node("attn_out", l, p)`` (``granularity="layer"``);
* ``Node("mlp_out", l, p)``;
* one logit node ``Node("logit", n_layers, last, answer_id)``: the metric (e.g. the logit difference).

Outputs ``a_u`` live in the residual stream: the embedding, ``hook_mlp_out``, ``hook_attn_out`` and, for a head,
its share ``z_h @ W_O[h]`` of the attention output. Where the attention has a post-norm (Gemma 2/3), a head's
share is taken with the post-norm's scale frozen at its value in that run (``z_h W_O[h] * gamma / rms(o)``), so
the heads of a layer add up exactly to ``hook_attn_out``.

Inputs (the targets of edges), with the gradient flowing through that component only:

* MLP ``(l, p)``: ``blocks.{l}.hook_mlp_in`` at ``p`` — a source at ``p`` reaches it only through the residual at
  ``p`` (edge ``u(p) -> mlp(l, p)``);
* attention ``(l, q)`` (a head ``(l, h, q)`` or the layer ``(l, q)``): the attention's input
  ``blocks.{l}.hook_attn_in`` at every key/query position ``p <= q``, through the attention's *output at q* only.
  Attention moves information between positions, so a source ``u(p)`` has an edge to the attention node at every
  ``q >= p``; its weight is the part of the gradient at ``hook_attn_in[p]`` that flows through the output at ``q``
  (through queries, keys and values alike). These per-``q`` (and per-head) gradients are vector-Jacobian products
  of each attention layer alone, computed for all layers at once in one batched backward pass per query
  position (the residual stream is detached between layers);
* the logit node: the final residual (``blocks.{L-1}.hook_resid_post``), i.e. the direct effects.

Edge scores (Syed et al. 2023, "Attribution patching outperforms automated circuit discovery"; Hanna et al.
2024, "Have faith in faithfulness")::

    score(u -> v) = (a_u(clean) - a_u(corrupted)) . mean_k w_k * d m / d in_v  at  x(alpha_k)

``x(alpha) = emb(corrupted) + alpha * (emb(clean) - emb(corrupted))`` interpolates the token embeddings
(EAP-IG). ``method="eap"`` uses one point, ``alpha = 1`` (the **clean** run's gradient, as in Syed et al.:
``m(patched) ~ m(clean) - score``); ``method="eap-ig"`` uses ``n_steps`` points of a Captum-style rule
(``"riemann_right"`` — ``alpha_k = k / n_steps``, so ``n_steps=1`` is exactly EAP —, ``"riemann_left"``,
``"riemann_middle"``, ``"riemann_trapezoid"``, ``"gausslegendre"``). A positive score means the clean value of
the edge raises the metric; patching the edge alone to its corrupted value changes ``m`` by about ``-score``.

Because every output is added to the residual, the sum of a node's outgoing edge scores is its node-level
attribution-patching score ``(a_u(clean) - a_u(corr)) . d m / d a_u`` (stored as ``NodeInfo.score``), and the
sum of all edges into the logit is ``(resid(clean) - resid(corr)) . d m / d resid_final`` — exactly
``m(clean) - m(corr)`` when the metric is linear in the final residual.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.attribution.inputs import PairInputs, check_pairs, noise_hook
from circuit_discovery.errors import InputError
from circuit_discovery.graph.circuit import Circuit, combine_graphs
from circuit_discovery.graph.graph import AttributionGraph, NodeInfo
from circuit_discovery.graph.prune import prune_graph
from circuit_discovery.metrics import batch_from_pairs, get_metric
from circuit_discovery.models.arch import get_module
from circuit_discovery.models.hooked import frozen
from circuit_discovery.nodes import Node

__all__ = [
    "GRANULARITIES", "METHODS", "IG_RULES", "ComponentLayout", "ComponentCircuitResult", "ig_points",
    "head_outputs", "component_edge_scores", "component_graphs", "component_circuit",
]

GRANULARITIES = ("head", "layer")
METHODS = ("eap", "eap-ig")
IG_RULES = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre")


# ----------------------------------------------------------------------------------------------- helpers
def ig_points(n_steps: int, rule: str = "riemann_right") -> tuple[list[float], list[float]]:
    """Interpolation points ``alpha`` in [0, 1] and weights (summing to 1) of a Captum-style quadrature rule."""
    if int(n_steps) != n_steps or n_steps < 1:
        raise InputError(f"n_steps must be a positive integer, got {n_steps!r}")
    n = int(n_steps)
    if rule == "riemann_right":
        a = [(k + 1) / n for k in range(n)]
        w = [1.0 / n] * n
    elif rule == "riemann_left":
        a = [k / n for k in range(n)]
        w = [1.0 / n] * n
    elif rule == "riemann_middle":
        a = [(k + 0.5) / n for k in range(n)]
        w = [1.0 / n] * n
    elif rule == "riemann_trapezoid":
        if n < 2:
            raise InputError("riemann_trapezoid needs n_steps >= 2")
        a = [k / (n - 1) for k in range(n)]
        w = [1.0 / (n - 1)] * n
        w[0] = w[-1] = 0.5 / (n - 1)
    elif rule == "gausslegendre":
        x, wt = np.polynomial.legendre.leggauss(n)
        a = ((x + 1) / 2).tolist()
        w = (wt / 2).tolist()
    else:
        raise InputError(f"unknown integration rule {rule!r}; choose one of {', '.join(IG_RULES)}")
    return a, w


def _o_proj_heads(model, layer: int) -> Tensor:
    """The output projection of ``layer`` split by head: ``[n_heads, d_head, d_model]``."""
    cfg = model.cfg
    mod = get_module(model._layers[layer], model.spec.z_proj)
    W = mod.weight if type(mod).__name__ == "Conv1D" else mod.weight.T  # GPT-2 Conv1D: [in, out]
    return W.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)


def _post_norm(model, l: int):
    """The attention's post-norm module (Gemma 2/3) or None."""
    if model.spec.attn_out == model.spec.attn:
        return None
    return get_module(model._layers[l], model.spec.attn_out)


def head_outputs(model, layer: int, z: Tensor) -> Tensor:
    """Each head's additive share of ``hook_attn_out``: ``[batch, pos, n_heads, d_model]`` from ``z``
    ``[batch, pos, n_heads, d_head]``; with a post-norm, its scale ``gamma / rms(o)`` is frozen at this run's
    value so that the heads sum to ``hook_attn_out`` (minus any output bias)."""
    W = _o_proj_heads(model, layer).to(z.dtype)
    c = torch.einsum("bphk,hkd->bphd", z, W)
    norm = _post_norm(model, layer)
    if norm is None:
        return c
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    d = c.shape[-1]
    ones = torch.ones(d, dtype=z.dtype, device=z.device)
    gamma = norm(ones) * math.sqrt(1.0 + eps)  # works for weight and (1 + weight) conventions
    o = c.sum(2)
    mod = get_module(model._layers[layer], model.spec.z_proj)
    if getattr(mod, "bias", None) is not None:
        o = o + mod.bias
    scale = gamma / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps)  # [b, p, d]
    return c * scale[:, :, None, :]


_no_param_grad = frozen  # parameters need no gradients: edges are gradients w.r.t. activations


@dataclass(frozen=True)
class ComponentLayout:
    """Node order of a component graph for prompts of ``n_pos`` tokens.

    Source slots ``s`` (``[n_src]``): 0 = embed, then per layer the heads (or one attention slot) and the MLP.
    Node ``s * n_pos + p`` is slot ``s`` at position ``p``; the last node (``n_src * n_pos``) is the logit.
    """

    n_layers: int
    n_heads: int
    n_pos: int
    granularity: str

    @property
    def n_attn(self) -> int:
        return self.n_heads if self.granularity == "head" else 1

    @property
    def n_src(self) -> int:
        return 1 + self.n_layers * (self.n_attn + 1)

    @property
    def n_nodes(self) -> int:
        return self.n_src * self.n_pos + 1

    def attn_slot(self, layer: int, head: int = 0) -> int:
        return 1 + layer * (self.n_attn + 1) + head

    def mlp_slot(self, layer: int) -> int:
        return 1 + layer * (self.n_attn + 1) + self.n_attn

    def slot_layers(self) -> Tensor:
        """``[n_src]`` layer of each slot (-1 for embed)."""
        out = [-1]
        for l in range(self.n_layers):
            out += [l] * (self.n_attn + 1)
        return torch.tensor(out)

    def slot_is_mlp(self) -> Tensor:
        out = [False]
        for _ in range(self.n_layers):
            out += [False] * self.n_attn + [True]
        return torch.tensor(out)

    def node(self, slot: int, pos: int) -> Node:
        if slot == 0:
            return Node("embed", -1, pos)
        l, k = divmod(slot - 1, self.n_attn + 1)
        if k == self.n_attn:
            return Node("mlp_out", l, pos)
        if self.granularity == "head":
            return Node("head", l, pos, k)
        return Node("attn_out", l, pos)


# ----------------------------------------------------------------------------------------------- core
def _interp_hook(e_clean: Tensor, e_corr: Tensor, alpha: float, requires_grad: bool):
    x = (e_corr + alpha * (e_clean - e_corr)).detach()
    if requires_grad:
        x.requires_grad_(True)

    def fn(act, name):
        return x[:, : act.shape[1]]
    return fn


def _outputs(model, tokens: Tensor, layout: ComponentLayout, noise: Tensor | None = None) -> Tensor:
    """Residual-space outputs of every source slot ``[batch, n_src, pos, d_model]`` (no gradients); ``noise``
    [batch, pos, d_model] is added to ``hook_embed`` (ROME-style corruption of the subject)."""
    L = layout.n_layers
    names = ["hook_embed"] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    names += [f"blocks.{l}.attn.hook_z" if layout.granularity == "head" else f"blocks.{l}.hook_attn_out"
              for l in range(L)]
    with torch.no_grad(), model.hooks(noise_hook(noise)):
        _, cache = model.run_with_cache(tokens, names=names, return_logits=False)
        b, n, d = cache["hook_embed"].shape
        out = torch.zeros(b, layout.n_src, n, d, dtype=cache["hook_embed"].dtype, device=tokens.device)
        out[:, 0] = cache["hook_embed"]
        for l in range(L):
            if layout.granularity == "head":
                hz = head_outputs(model, l, cache[f"blocks.{l}.attn.hook_z"])  # [b, n, H, d]
                s0 = layout.attn_slot(l, 0)
                out[:, s0: s0 + layout.n_heads] = hz.permute(0, 2, 1, 3)
            else:
                out[:, layout.attn_slot(l)] = cache[f"blocks.{l}.hook_attn_out"]
            out[:, layout.mlp_slot(l)] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def _base_gradients(model, batch, metric_fn, e_clean, e_corr, alpha, layout):
    """One forward/backward at ``alpha``: gradients at mlp_in, attention output (z or attn_out) and final resid."""
    L = layout.n_layers
    store: dict[str, Tensor] = {}

    def keep(act, name):
        y = act.clone()
        store[name] = y
        return y

    attn_name = "attn.hook_z" if layout.granularity == "head" else "hook_attn_out"
    hooks = [("hook_embed", _interp_hook(e_clean, e_corr, alpha, True))]
    hooks += [(f"blocks.{l}.hook_mlp_in", keep) for l in range(L)]
    hooks += [(f"blocks.{l}.{attn_name}", keep) for l in range(L)]
    hooks += [(f"blocks.{L - 1}.hook_resid_post", keep)]
    with torch.enable_grad(), model.hooks(hooks):
        hidden = model.final_hidden(batch.tokens, batch.mask)
        m = metric_fn(model, hidden, batch)
    names = [f"blocks.{l}.hook_mlp_in" for l in range(L)] + [f"blocks.{l}.{attn_name}" for l in range(L)]
    names.append(f"blocks.{L - 1}.hook_resid_post")
    grads = torch.autograd.grad(m.sum(), [store[n] for n in names], allow_unused=True)
    grads = [torch.zeros_like(store[n]) if g is None else g for n, g in zip(names, grads)]
    return (torch.stack(grads[:L], 1), grads[L: 2 * L], grads[-1], m.detach())


def _cut_attention_hooks(e_clean, e_corr, alpha, layout):
    """Hooks that make every layer's attention a separate function of its own input: ``hook_attn_in`` becomes a
    fresh leaf (``leaves[l]``) and the attention output (``z`` per head, or ``attn_out``) is recorded
    (``outs[l]``) and passed on detached. Returns ``(hooks, leaves, outs)``; the dicts fill during the forward."""
    leaves: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}

    def leaf(act, name):
        x = act.detach().requires_grad_(True)
        leaves[int(name.split(".")[1])] = x
        return x

    def cut(act, name):
        outs[int(name.split(".")[1])] = act
        return act.detach()

    attn_name = "attn.hook_z" if layout.granularity == "head" else "hook_attn_out"
    hooks = [("hook_embed", _interp_hook(e_clean, e_corr, alpha, False))]
    hooks += [(f"blocks.{l}.hook_attn_in", leaf) for l in range(layout.n_layers)]
    hooks += [(f"blocks.{l}.{attn_name}", cut) for l in range(layout.n_layers)]
    return hooks, leaves, outs


def _attention_vjps(model, tokens, e_clean, e_corr, alpha, g_attn, q: int, layout) -> Tensor:
    """Gradient at every layer's ``hook_attn_in`` (positions ``<= q``) flowing through the attention output at
    position ``q`` only (per head in head mode): ``[batch, n_layers, n_attn, q + 1, d_model]``.

    The reference form (one forward cut after ``q`` and one backward per query position); the edge scores use
    :func:`_attention_vjps_all`, which the tests check against this."""
    L, A = layout.n_layers, layout.n_attn
    b = tokens.shape[0]
    toks = tokens[:, : q + 1].repeat_interleave(A, 0)  # rows (prompt i, head h) -> i * A + h
    ec = e_clean[:, : q + 1].repeat_interleave(A, 0)
    er = e_corr[:, : q + 1].repeat_interleave(A, 0)
    head_idx = torch.arange(A, device=tokens.device).repeat(b)
    hooks, leaves, outs = _cut_attention_hooks(ec, er, alpha, layout)
    with torch.enable_grad(), model.hooks(hooks):
        model.final_hidden(toks, torch.ones_like(toks))
        total: float | Tensor = 0.0
        rows = torch.arange(toks.shape[0], device=toks.device)
        for l in range(L):
            g = g_attn[l][:, q].repeat_interleave(A, 0)  # [rows, (H, dh) | d]
            o = outs[l][:, q]
            if layout.granularity == "head":
                total = total + (o[rows, head_idx] * g[rows, head_idx]).sum()
            else:
                total = total + (o * g).sum()
    assert isinstance(total, Tensor)  # n_layers >= 1
    grads = torch.autograd.grad(total, [leaves[l] for l in range(L)], allow_unused=True)
    filled = [torch.zeros_like(leaves[l]) if gr is None else gr for l, gr in enumerate(grads)]
    G = torch.stack(filled, 1)  # [rows, L, q+1, d]
    return G.reshape(b, A, L, q + 1, -1).permute(0, 2, 1, 3, 4)


def _attention_vjps_all(model, tokens, e_clean, e_corr, alpha, g_attn, layout) -> list[Tensor]:
    """:func:`_attention_vjps` for every query position ``q`` from **one** forward pass: the full-length run
    gives the same attention outputs at ``q`` as a run cut after ``q`` (causal attention), and the ``n x n_attn``
    per-(query, head) backward passes run as one vmapped backward (``is_grads_batched``). Returns the list over
    ``q`` of ``[batch, n_layers, n_attn, q + 1, d_model]``."""
    L, A = layout.n_layers, layout.n_attn
    b, n = tokens.shape
    hooks, leaves, outs = _cut_attention_hooks(e_clean, e_corr, alpha, layout)
    with torch.enable_grad(), model.hooks(hooks):
        model.final_hidden(tokens, torch.ones_like(tokens))
        total: float | Tensor = 0.0
        for l in range(L):
            prod = (outs[l] * g_attn[l]).sum(-1)  # [b, n, H] (head) or [b, n] (layer)
            total = total + (prod if layout.granularity == "head" else prod[..., None]).sum(0)  # [n, A]
    assert isinstance(total, Tensor)  # n_layers >= 1
    y = total.reshape(n * A)
    grads = torch.autograd.grad(y, [leaves[l] for l in range(L)], grad_outputs=torch.eye(n * A, dtype=y.dtype),
                                allow_unused=True, is_grads_batched=True)
    filled = [torch.zeros(n * A, *leaves[l].shape, dtype=leaves[l].dtype) if gr is None else gr
              for l, gr in enumerate(grads)]
    G = torch.stack(filled, 2).reshape(n, A, b, L, n, -1)  # [q, h, b, L, p, d]
    return [G[q, :, :, :, : q + 1].permute(1, 2, 0, 3, 4) for q in range(n)]


def component_edge_scores(model, pairs: Sequence, *, metric="logit_diff", granularity: str = "head",
                          method: str = "eap-ig", n_steps: int = 5, rule: str = "riemann_right",
                          noise_scale: float = 3.0, seed: int = 0,
                          ) -> tuple[ComponentLayout, Tensor, Tensor, dict[str, Tensor]]:
    """Edge scores of equal-length ``pairs`` (one batch). Pairs with ``corruption="noise"`` are corrupted by
    Gaussian noise of ``noise_scale`` x the embedding std on the subject (seeded, as in causal tracing).

    Returns ``(layout, A, node_scores, extra)``: ``A`` ``[batch, n_nodes, n_nodes]`` (``A[b, target, source]``,
    float64), ``node_scores`` ``[batch, n_nodes]`` (sum of outgoing edges; for the logit node ``m(clean) -
    m(corr)``), ``extra`` with ``m_clean``, ``m_corrupted`` ``[batch]``, ``delta`` (source output differences
    ``[batch, n_src, pos, d_model]``) and ``attn_in_grad`` (the summed per-query attention gradients
    ``[batch, n_layers, pos, d_model]``, for checks).
    """
    check_pairs(pairs)
    if granularity not in GRANULARITIES:
        raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    lengths = {len(p.clean_tokens) for p in pairs}
    if len(lengths) != 1:
        raise InputError(f"component_edge_scores needs equal-length pairs, got lengths {sorted(lengths)}; "
                         "use component_graphs, which groups them")
    alphas, weights = ([1.0], [1.0]) if method == "eap" else ig_points(n_steps, rule)
    metric_fn = get_metric(metric)
    cfg = model.cfg
    n = lengths.pop()
    layout = ComponentLayout(cfg.n_layers, cfg.n_heads, n, granularity)
    batch = batch_from_pairs(model, pairs)
    corr_tokens = batch_from_pairs(model, pairs, corrupted=True).tokens
    if batch.tokens.shape[1] != n:
        raise InputError("pairs must not be teacher-forced for component graphs")
    noise = PairInputs.from_pairs(model, pairs, noise_scale=noise_scale, seed=seed).noise  # noise pairs only
    with torch.no_grad():
        e_clean, e_corr = model.embed(batch.tokens), model.embed(corr_tokens)
        if noise is not None:
            e_corr = e_corr + noise.to(e_corr.dtype)
        delta = _outputs(model, batch.tokens, layout) - _outputs(model, corr_tokens, layout, noise)  # [b,S,n,d]
    b, S, L = len(pairs), layout.n_src, cfg.n_layers
    slot_layer = layout.slot_layers().to(delta.device)
    E_mlp = torch.zeros(b, L, S, n, dtype=torch.float64)
    E_att = torch.zeros(b, L, layout.n_attn, n, S, n, dtype=torch.float64)  # [b, l, h, q, s, p]
    E_log = torch.zeros(b, S, n, dtype=torch.float64)
    attn_in_grad = torch.zeros(b, L, n, cfg.d_model, dtype=torch.float64)
    m_vals = {}
    with _no_param_grad(model):
        for alpha, w in zip(alphas, weights):
            g_mlp, g_attn, g_fin, m = _base_gradients(model, batch, metric_fn, e_clean, e_corr, alpha, layout)
            m_vals[alpha] = m
            E_mlp += w * torch.einsum("bspd,blpd->blsp", delta, g_mlp).double().cpu()
            E_log += w * torch.einsum("bspd,bpd->bsp", delta, g_fin).double().cpu()
            for q, G in enumerate(_attention_vjps_all(model, batch.tokens, e_clean, e_corr, alpha, g_attn, layout)):
                E_att[:, :, :, q, :, : q + 1] += w * torch.einsum(
                    "bspd,blhpd->blhsp", delta[:, :, : q + 1], G).double().cpu()
                attn_in_grad[:, :, : q + 1] += w * G.sum(2).double().cpu()
    # assemble the adjacency
    N = layout.n_nodes
    A = torch.zeros(b, N, N, dtype=torch.float64)
    pos = torch.arange(n)
    src_nodes = (torch.arange(S)[:, None] * n + pos[None, :])  # [S, n]
    sl = slot_layer.cpu()
    for l in range(L):
        allowed_att = sl < l  # sources strictly below layer l
        ms = layout.mlp_slot(l)
        allowed_mlp = allowed_att.clone()
        allowed_mlp[layout.attn_slot(l, 0): layout.attn_slot(l, 0) + layout.n_attn] = True
        # MLP (l, p) <- s(p)
        rows = ms * n + pos  # [n]
        vals = E_mlp[:, l] * allowed_mlp[None, :, None]  # [b, S, n]
        A[:, rows[None, :].expand(S, n), src_nodes] = vals
        # attention (l, h, q) <- s(p), p <= q
        for h in range(layout.n_attn):
            t_rows = layout.attn_slot(l, h) * n + pos  # [n] over q
            v = E_att[:, l, h] * allowed_att[None, None, :, None]  # [b, q, S, p]
            A[:, t_rows[:, None, None].expand(n, S, n), src_nodes[None].expand(n, S, n)] = v
    A[:, N - 1, src_nodes] = E_log
    node_scores = A.sum(1)
    with torch.no_grad():
        m_clean = metric_fn(model, model.final_hidden(batch.tokens, batch.mask), batch).double().cpu()
        cb = batch_from_pairs(model, pairs, corrupted=True)
        with model.hooks(noise_hook(noise)):
            m_corr = metric_fn(model, model.final_hidden(cb.tokens, cb.mask), cb).double().cpu()
    node_scores[:, N - 1] = m_clean - m_corr
    extra = {"m_clean": m_clean, "m_corrupted": m_corr, "delta": delta.detach().cpu(),
             "attn_in_grad": attn_in_grad}
    return layout, A, node_scores, extra


def component_graphs(model, pairs: Sequence, *, metric="logit_diff", granularity: str = "head",
                     method: str = "eap-ig", n_steps: int = 5, rule: str = "riemann_right",
                     batch_size: int = 32) -> list[AttributionGraph]:
    """One :class:`AttributionGraph` per fact pair (same order as ``pairs``); pairs are grouped by length and
    batched (``batch_size`` prompts per backward pass). ``NodeInfo.score`` is the node's attribution-patching
    score (the sum of its outgoing edges), ``activation`` the norm of its clean output."""
    check_pairs(pairs)
    out: list[AttributionGraph | None] = [None] * len(pairs)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(len(p.clean_tokens), []).append(i)
    for _, idx in sorted(groups.items()):
        for c in range(0, len(idx), batch_size):
            chunk = idx[c: c + batch_size]
            sub = [pairs[i] for i in chunk]
            layout, A, scores, extra = component_edge_scores(
                model, sub, metric=metric, granularity=granularity, method=method, n_steps=n_steps, rule=rule)
            for j, i in enumerate(chunk):
                out[i] = _graph_of(model, pairs[i], layout, A[j], scores[j], method, n_steps, rule, metric)
    return out  # type: ignore[return-value]


def _graph_of(model, pair, layout: ComponentLayout, A: Tensor, scores: Tensor, method, n_steps, rule,
              metric) -> AttributionGraph:
    n = layout.n_pos
    toks = list(pair.clean_tokens)
    str_toks = [model.tokenizer.decode([t]) for t in toks]
    nodes = []
    for s in range(layout.n_src):
        for p in range(n):
            nd = layout.node(s, p)
            nodes.append(NodeInfo(node=nd, label=nd.label(str_toks), score=float(scores[s * n + p]),
                                  role=None, token=str_toks[p] if s == 0 else None,
                                  token_id=toks[p] if s == 0 else None))
    logit = Node("logit", layout.n_layers, n - 1, int(pair.answer_tokens[0]))
    nodes.append(NodeInfo(node=logit, label=f"metric {metric if isinstance(metric, str) else 'custom'}",
                          score=float(scores[-1]), token=model.tokenizer.decode([pair.answer_tokens[0]])))
    return AttributionGraph(
        nodes=nodes, adjacency=A, logit_indices=[len(nodes) - 1], logit_probabilities=torch.ones(1),
        prompt=pair.clean_prompt, prompt_tokens=str_toks, prompt_token_ids=toks, n_layers=layout.n_layers,
        metadata={"method": method, "n_steps": n_steps if method == "eap-ig" else 1, "rule": rule,
                  "granularity": layout.granularity, "metric": metric if isinstance(metric, str) else "custom",
                  "corrupted_prompt": pair.corrupted_prompt, "answer": pair.answer,
                  "counterfactual_answer": pair.counterfactual_answer, "roles": list(pair.roles),
                  "model": model.cfg.model_name})


@dataclass
class ComponentCircuitResult:
    """A relation's component circuit: the pruned :class:`Circuit`, the role-keyed combined graph it was pruned
    from, and the per-prompt graphs."""

    circuit: Circuit
    combined: AttributionGraph
    graphs: list[AttributionGraph]
    info: dict[str, Any] = field(default_factory=dict)

    def ranked_nodes(self, include_embed: bool = True) -> list[str]:
        """Ids of the combined graph's component nodes ranked by |score| (the logit node excluded)."""
        items = [(abs(nd.score or 0.0), nd.id) for nd in self.combined.nodes
                 if nd.kind != "logit" and (include_embed or nd.node.component != "embed")]
        return [i for _, i in sorted(items, key=lambda t: -t[0])]


def component_circuit(model, pairs: Sequence, *, name: str | None = None, metric="logit_diff",
                      granularity: str = "head", method: str = "eap-ig", n_steps: int = 5,
                      rule: str = "riemann_right", node_threshold: float = 0.8, edge_threshold: float = 0.98,
                      batch_size: int = 32, **prune_kwargs: Any) -> ComponentCircuitResult:
    """Per-prompt component graphs of a relation's ``pairs``, combined by role (``FactPair.roles``) with
    :func:`combine_graphs` and pruned by influence (:func:`prune_graph`)."""
    graphs = component_graphs(model, pairs, metric=metric, granularity=granularity, method=method,
                              n_steps=n_steps, rule=rule, batch_size=batch_size)
    relation = pairs[0].relation
    facts = [{"prompt": p.clean_prompt, "answer": p.answer} for p in pairs]
    circuit, combined = combine_graphs(graphs, [list(p.roles) for p in pairs], name=name or relation,
                                       relation=relation, facts=facts, node_threshold=node_threshold,
                                       edge_threshold=edge_threshold, **prune_kwargs)
    circuit.extra.setdefault("method", method)
    circuit.extra.setdefault("granularity", granularity)
    info = {"nodes_before": combined.n_nodes, "edges_before": int((combined.adjacency != 0).sum()),
            "nodes_after": len(circuit.nodes), "edges_after": len(circuit.edges)}
    return ComponentCircuitResult(circuit, combined, graphs, info)


def prune_component_graph(graph: AttributionGraph, **kwargs: Any):
    """:func:`prune_graph` on a component graph (re-exported for symmetry)."""
    return prune_graph(graph, **kwargs)
