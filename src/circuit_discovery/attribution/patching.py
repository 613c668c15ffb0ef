"""Exact activation patching, batched.

*Denoising*: run the corrupted prompt and restore one node's clean activation; the score is
``m(patched) - m(corrupted)``. *Noising*: run the clean prompt and insert one node's corrupted activation;
the score is ``m(patched) - m(clean)`` (negative where the node matters). ``normalize=True`` divides by
``m(clean) - m(corrupted)`` per prompt (denoising then reads 1 = "restores the whole effect").

How it is fast:

* the clean and the corrupted caches are computed once;
* every patched run is one row of a batched forward: variants are stacked along the batch dimension
  (``batch_size`` rows per forward) and each row carries its own patch (row, position, head);
* a run patched at layer ``l`` starts at layer ``l`` from the cached ``resid_pre`` of the base run
  (:meth:`HookedModel.start_at_layer`): the layers below are not recomputed;
* only the metric's logits are computed (``model.final_hidden`` + the metric: two unembedding rows for
  ``logit_diff``).

Granularities: ``resid_pre``/``resid_mid``/``resid_post``/``attn_out``/``mlp_out`` at (layer, position) or at
all positions (``positions="all"``); ``head`` at (layer, head) over all positions, or per position with
``head_positions=True``; ``window=w`` patches the same node in ``w`` consecutive layers (starting at the node's
layer, or centred on it with ``window_align="center"`` as in ROME).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuit_discovery.attribution.inputs import (
    POSITIONAL,
    PairInputs,
    as_inputs,
    cached_run,
    check_direction,
    hook_for,
    metric_name,
    select,
)
from circuit_discovery.attribution.scores import Scores
from circuit_discovery.errors import InputError
from circuit_discovery.metrics import get_metric
from circuit_discovery.nodes import Node

PATCHABLE = POSITIONAL + ("head",)


@dataclass(frozen=True)
class Patch:
    """One replaced activation: hook, position (None = all) and head (None = whole activation)."""
    hook: str
    position: int | None = None
    head: int | None = None


def window_layers(layer: int, window: int, n_layers: int, align: str = "start") -> list[int]:
    """Layers of a window of ``window`` consecutive layers at ``layer`` (clipped to the model)."""
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    if align == "start":
        lo = layer
    elif align == "center":
        lo = layer - window // 2
    else:
        raise InputError(f"window_align must be 'start' or 'center', got {align!r}")
    return [l for l in range(lo, lo + window) if 0 <= l < n_layers]


def node_patches(node: Node, n_layers: int, window: int = 1, align: str = "start") -> list[Patch]:
    """The patches that implement ``node`` (one per layer of its window)."""
    if node.component not in PATCHABLE:
        raise InputError(f"cannot patch component {node.component!r}; choose from {', '.join(PATCHABLE)}")
    if not 0 <= node.layer < n_layers:
        raise InputError(f"layer {node.layer} out of range 0..{n_layers - 1}")
    return [Patch(hook_for(node.component, l), node.position, node.index if node.component == "head" else None)
            for l in window_layers(node.layer, window, n_layers, align)]


_MIN_ROWS = 32  # patched runs per forward below which start-layer groups are merged


def _layer_of(hook: str) -> int:
    return int(hook.split(".")[1])


def patch_runs(model, inputs: PairInputs, variants: Sequence[tuple[int, Sequence[Patch]]], *,
               direction: str = "denoising", metric="logit_diff", batch_size: int = 64,
               caches: tuple[dict, dict] | None = None) -> Tensor:
    """Metric of each patched run [n_variants].

    ``variants``: ``(prompt index, patches)``; each patch replaces the base run's activation with the source
    run's (denoising: base corrupted, source clean; noising: the reverse). ``caches``: optional precomputed
    ``(base_cache, source_cache)`` holding every ``resid_pre`` of the base run and the patched hooks of the
    source run.
    """
    check_direction(direction)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    mfn = get_metric(metric)
    n_layers = model.cfg.n_layers
    base_batch = inputs.corrupted if direction == "denoising" else inputs.clean
    if caches is None:
        hooks = sorted({p.hook for _, ps in variants for p in ps})
        base_names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
        base_which, src_which = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
        _, base_cache = cached_run(model, inputs, base_which, base_names, metric)
        _, src_cache = cached_run(model, inputs, src_which, hooks, metric)
    else:
        base_cache, src_cache = caches
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (b, ps) in enumerate(variants):
        if not ps:
            raise InputError("a variant without patches: give each variant at least one Patch")
        if not 0 <= b < len(inputs):
            raise InputError(f"prompt index {b} out of range for {len(inputs)} prompts")
        groups[min(_layer_of(p.hook) for p in ps)].append(i)
    out = torch.empty(len(variants), dtype=torch.float64)
    dev = model.device
    # final hidden states wait until batch_size rows are pending, then the metric runs once on all of them: a
    # metric with a full-vocabulary unembedding (causal tracing's probability) reads the 262k-row unembedding
    # once per batch instead of once per (start layer, chunk), which dominates when groups are small
    pending: list[tuple[Tensor, Tensor, Tensor]] = []

    def flush():
        if pending:
            h, rows, idx = (torch.cat(x) for x in zip(*pending))
            out[idx] = mfn(model, h, select(inputs.clean, rows)).double().cpu()
            pending.clear()

    # small start-layer groups are merged into the group below them (a run that starts lower recomputes the
    # unpatched layers from the base cache, which changes nothing): many tiny forwards cost more than a few
    # full-size ones
    merged: list[tuple[int, list[int]]] = []
    for start in sorted(groups):
        if merged and len(merged[-1][1]) < min(_MIN_ROWS, batch_size):
            merged[-1][1].extend(groups[start])
        else:
            merged.append((start, list(groups[start])))
    with torch.no_grad():
        for start, idxs in merged:
            for c in range(0, len(idxs), batch_size):
                chunk = idxs[c:c + batch_size]
                rows = torch.tensor([variants[i][0] for i in chunk], device=dev)
                hooks = _chunk_hooks([variants[i][1] for i in chunk], rows, src_cache)
                resid = base_cache[f"blocks.{start}.hook_resid_pre"][rows]
                with model.start_at_layer(start, resid), model.hooks(hooks):
                    h = model.final_hidden(base_batch.tokens[rows], base_batch.mask[rows])
                pending.append((h, rows, torch.tensor(chunk)))
                if sum(len(p[1]) for p in pending) >= batch_size:
                    flush()
        flush()
    return out


def _chunk_hooks(patch_lists: Sequence[Sequence[Patch]], rows: Tensor, src_cache: dict) -> list:
    """Hook functions applying each row's patches: row r takes the source activation of prompt rows[r]."""
    per_hook: dict[str, dict[str, list]] = {}
    for row, patches in enumerate(patch_lists):
        for patch in patches:
            d = per_hook.setdefault(patch.hook, defaultdict(list))
            kind = ("all" if patch.position is None else "pos") + ("" if patch.head is None else "_head")
            d[kind].append((row, patch.position, patch.head))
    hooks = []
    for name, kinds in per_hook.items():
        if name not in src_cache:
            raise InputError(f"source cache lacks {name}")
        src = src_cache[name]
        dev = src.device
        idx = {}
        for kind, entries in kinds.items():
            r = torch.tensor([e[0] for e in entries], device=dev)
            b = rows[r]
            p = torch.tensor([e[1] if e[1] is not None else 0 for e in entries], device=dev)
            h = torch.tensor([e[2] if e[2] is not None else 0 for e in entries], device=dev)
            idx[kind] = (r, b, p, h)

        def fn(x, _name, idx=idx, src=src):
            x = x.clone()
            for kind, (r, b, p, h) in idx.items():
                if kind == "all":
                    x[r] = src[b].to(x.dtype)
                elif kind == "pos":
                    x[r, p] = src[b, p].to(x.dtype)
                elif kind == "all_head":
                    x[r, :, h] = src[b, :, h].to(x.dtype)
                else:
                    x[r, p, h] = src[b, p, h].to(x.dtype)
            return x

        hooks.append((name, fn))
    return hooks


def activation_patching(model, pairs, components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"), *,
                        direction: str = "denoising", metric="logit_diff", layers: Sequence[int] | None = None,
                        positions: Sequence[int] | str | None = None, window: int = 1, window_align: str = "start",
                        head_positions: bool = False, batch_size: int = 64, normalize: bool = False,
                        noise_scale: float = 3.0, seed: int = 0) -> Scores:
    """Exact patching of every node of ``components`` x ``layers`` x positions (or heads) -> :class:`Scores`.

    ``pairs``: FactPairs (clean and corrupted prompts of equal length; ``corruption="noise"`` pairs get Gaussian
    noise of ``noise_scale`` x the embedding std on the subject, seeded by ``seed``) or a :class:`PairInputs`.
    ``positions``: None (every position), a list of positions, or ``"all"`` (one node per layer patching every
    position at once). Scores: ``m(patched) - m(base)`` per prompt (see the module docstring);
    ``clean_metric``/``corrupted_metric`` hold the unpatched metrics.
    """
    check_direction(direction)
    inputs = as_inputs(model, pairs, noise_scale=noise_scale, seed=seed)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [c for c in components if c not in PATCHABLE]
    if bad:
        raise InputError(f"cannot patch {bad}; choose components from {', '.join(PATCHABLE)}")
    n_pos = inputs.clean.tokens.shape[1]
    if positions == "all":
        pos_list: list[int | None] = [None]
    elif positions is None:
        pos_list = list(range(n_pos))
    elif isinstance(positions, str):
        raise InputError(f"positions must be None, 'all' or a list of ints, got {positions!r}")
    else:
        given = list(positions)
        if any(not 0 <= p < n_pos for p in given):
            raise InputError(f"positions {given} out of range 0..{n_pos - 1}")
        pos_list = list(given)
    nodes: list[Node] = []
    for comp in components:
        for l in layers:
            if comp == "head":
                hp = pos_list if head_positions else [None]
                nodes += [Node("head", l, p, h) for p in hp for h in range(model.cfg.n_heads)]
            else:
                nodes += [Node(comp, l, p) for p in pos_list]
    lengths = inputs.lengths
    variants, where = [], []
    for j, node in enumerate(nodes):
        ps = node_patches(node, n_layers, window, window_align)
        for b in range(len(inputs)):
            if node.position is not None and node.position >= lengths[b]:
                continue
            variants.append((b, ps))
            where.append((b, j))
    hooks = sorted({p.hook for _, ps in variants for p in ps})
    base_which, src_which = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    m_base, base_cache = cached_run(model, inputs, base_which,
                                    [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)], metric)
    m_src, src_cache = cached_run(model, inputs, src_which, hooks, metric)
    m = patch_runs(model, inputs, variants, direction=direction, metric=metric, batch_size=batch_size,
                   caches=(base_cache, src_cache))
    values = torch.full((len(inputs), len(nodes)), float("nan"), dtype=torch.float64)
    base = m_base.double().cpu()
    for (b, j), v in zip(where, m.tolist()):
        values[b, j] = v - base[b]
    clean_m, corr_m = (m_src, m_base) if direction == "denoising" else (m_base, m_src)
    scores = Scores(nodes=nodes, values=values, tokens=inputs.tokens, roles=inputs.roles, clean_metric=clean_m,
                    corrupted_metric=corr_m, method=f"activation_patching_{direction}", metric=metric_name(metric),
                    meta={"direction": direction, "window": window, "window_align": window_align})
    return scores.normalized() if normalize else scores
