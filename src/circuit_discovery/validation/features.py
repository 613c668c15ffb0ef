"""Evaluating feature circuits: ``m(C)`` with every transcoder feature, error node and embedding outside ``C``
ablated, in the model whose MLPs are replaced by their transcoders.

Node ids are role-keyed as in relation circuits (:func:`circuit_discovery.graph.role_key`):
``feature/L{l}/I{f}/{role}``, ``error/L{l}/{role}``, ``embed/L-1/{role}``; a node covers every position of a
prompt with that role. The evaluated model runs the clean prompt with

* each MLP output (``blocks.{l}.hook_mlp_out``) = ``decode(features) + error`` where the features are the
  transcoder's encoding of the *live* MLP input (so ablations upstream propagate), those outside ``C`` replaced
  by their ablation value, and the error node held at its clean value (in ``C``) or its ablation value (not in
  ``C``); a layer without a transcoder has only its error node, the whole MLP output;
* each embedding outside ``C`` replaced by its ablation value;
* attention and norms computed normally.

Ablation values: ``"corrupted"`` (default) -- the feature activations, errors and embeddings of the corrupted
prompt's run (ROME noise for noise pairs); ``"zero"`` -- zero. So ``m(N)`` is the clean metric and ``m(∅)``
the fully ablated one (for ``"corrupted"`` exactly the corrupted run), and faithfulness ``f(N) = 1``,
``f(∅) = 0`` by construction. The universe ``N`` holds every embedding and error node per role, and every
feature active (in the clean or the ablation run) at some position of that role.

The interface matches :class:`~circuit_discovery.validation.ablation.CircuitEvaluator` (``metric_of``,
``faithfulness``, ``curve``, ``random_baseline``, ``completeness``, ``minimality``), so
:mod:`circuit_discovery.validation.curves` applies unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from circuit_discovery.attribution._common import PairInputs, check_pairs, noise_hook
from circuit_discovery.errors import InputError
from circuit_discovery.facts.types import ROLES
from circuit_discovery.metrics import batch_from_pairs, get_metric
from circuit_discovery.validation.ablation import EvaluatorMethods, parse_component_id

__all__ = ["FeatureCircuitEvaluator", "FEATURE_ABLATIONS"]

FEATURE_ABLATIONS = ("corrupted", "zero")
_ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}


class _FGroup:
    def __init__(self, pairs, idx):
        self.pairs = [pairs[i] for i in idx]
        self.idx = idx


class FeatureCircuitEvaluator(EvaluatorMethods):
    """``m(C)`` for feature circuits on fact pairs (see module docstring).

    Args:
        model: a HookedModel. transcoders: ``{layer: transcoder}``. pairs: FactPairs.
        metric: a metric name or callable (as for :class:`CircuitEvaluator`).
        ablation: ``"corrupted"`` or ``"zero"``.
        max_batch: rows per forward pass (variants x prompts).
    """

    def __init__(self, model, transcoders: Mapping[int, Any], pairs: Sequence, metric: Any = "logit_diff",
                 ablation: str = "corrupted", max_batch: int = 64) -> None:
        if not pairs:
            raise InputError("FeatureCircuitEvaluator needs at least one fact pair")
        if ablation not in FEATURE_ABLATIONS:
            raise InputError(f"feature circuits support ablation {FEATURE_ABLATIONS}, got {ablation!r}")
        if not transcoders:
            raise InputError("FeatureCircuitEvaluator needs transcoders; train them with sae.train_transcoders")
        check_pairs(pairs)
        self.model, self.pairs = model, list(pairs)
        self.tcs = {int(l): tc for l, tc in sorted(transcoders.items())}
        self.metric_fn = get_metric(metric)
        self.ablation = ablation
        self.max_batch = int(max_batch)
        self.n_evaluations = 0
        L = model.cfg.n_layers
        names = ["hook_embed"] + [f"blocks.{l}.hook_mlp_out" for l in range(L)] + \
                [f"blocks.{l}.ln2.hook_normalized" for l in self.tcs]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(self.pairs):
            by_len.setdefault(len(p.clean_tokens), []).append(i)
        self._groups: list[_FGroup] = []
        active: dict[tuple[int, str], set[int]] = {}
        for n, idx in sorted(by_len.items()):
            g = _FGroup(self.pairs, idx)
            g.batch = batch_from_pairs(model, g.pairs)
            with torch.no_grad():
                _, clean = model.run_with_cache(g.batch.tokens, names=names, attention_mask=g.batch.mask,
                                                return_logits=False)
                g.clean_acts = {l: tc.encode(clean[f"blocks.{l}.ln2.hook_normalized"]) for l, tc in self.tcs.items()}
                g.clean_err = {l: clean[f"blocks.{l}.hook_mlp_out"] - (self.tcs[l].decode(g.clean_acts[l])
                                                                       if l in self.tcs else 0.0)
                               for l in range(L)}
                if ablation == "corrupted":
                    cb = batch_from_pairs(model, g.pairs, corrupted=True)
                    noise = PairInputs.from_pairs(model, g.pairs).noise
                    with model.hooks(noise_hook(noise)):
                        _, corr = model.run_with_cache(cb.tokens, names=names, attention_mask=cb.mask,
                                                       return_logits=False)
                    g.abl_emb = corr["hook_embed"]
                    g.abl_acts = {l: tc.encode(corr[f"blocks.{l}.ln2.hook_normalized"]) for l, tc in self.tcs.items()}
                    g.abl_err = {l: corr[f"blocks.{l}.hook_mlp_out"] - (self.tcs[l].decode(g.abl_acts[l])
                                                                        if l in self.tcs else 0.0)
                                 for l in range(L)}
                else:
                    g.abl_emb = torch.zeros_like(clean["hook_embed"])
                    g.abl_acts = {l: torch.zeros_like(a) for l, a in g.clean_acts.items()}
                    g.abl_err = {l: torch.zeros_like(e) for l, e in g.clean_err.items()}
            g.role_masks = {r: torch.tensor([[rr == r for rr in p.roles] for p in g.pairs], dtype=torch.bool)
                            for r in ROLES}
            g.role_stack = torch.stack([g.role_masks[r] for r in ROLES]).float()  # [R, b, n]
            for l in self.tcs:
                on = (g.clean_acts[l] != 0) | (g.abl_acts[l] != 0)  # [b, n, d_sae]
                for r, m in g.role_masks.items():
                    if m.any():
                        active.setdefault((l, r), set()).update(on[m].any(0).nonzero().flatten().tolist())
            self._groups.append(g)
        present = [r for r in ROLES if any(r in p.roles for p in self.pairs)]
        ids = [f"embed/L-1/{r}" for r in present]
        for l in range(L):
            ids += [f"error/L{l}/{r}" for r in present]
            ids += [f"feature/L{l}/I{f}/{r}" for r in present for f in sorted(active.get((l, r), ()))]
        self._universe = ids
        self._parsed: dict[str, tuple | None] = {}

    @property
    def universe(self) -> list[str]:
        return list(self._universe)

    def _parse(self, node_id: str):
        comp, layer, index, role, position = parse_component_id(node_id)
        if comp == "logit":
            return None
        if comp not in ("embed", "error", "feature"):
            raise InputError(f"node {node_id!r}: feature circuits ablate embed, error and feature nodes, not {comp!r}")
        if role is None:
            raise InputError(f"node {node_id!r}: feature circuit nodes are role-keyed (e.g. feature/L3/I7/last)")
        L = self.model.cfg.n_layers
        if comp != "embed" and not 0 <= layer < L:
            raise InputError(f"node {node_id!r}: layer {layer} out of range 0..{L - 1}")
        if comp == "feature":
            if layer not in self.tcs:
                raise InputError(f"node {node_id!r}: no transcoder at layer {layer}")
            if index is None or not 0 <= index < self.tcs[layer].cfg.d_sae:
                raise InputError(f"node {node_id!r}: feature index missing or out of range")
        return comp, layer, index, role

    def metric_per_prompt(self, node_sets: Sequence[Iterable[str]]) -> Tensor:
        """``[len(node_sets), n_pairs]`` metric of each prompt (in ``pairs`` order) with each node set."""
        enc = [self._encode(s) for s in node_sets]
        total = torch.zeros(len(enc), len(self.pairs), dtype=torch.float64)
        if not enc:
            return total
        for g in self._groups:
            b, n = g.batch.tokens.shape
            roles = g.role_stack  # [R, b, n] float
            per = max(1, self.max_batch // b)
            for c in range(0, len(enc), per):
                chunk = enc[c: c + per]
                V = len(chunk)
                emb = torch.stack([e[0] for e in chunk]).float()  # [V, R]
                err = torch.stack([e[1] for e in chunk]).float()  # [V, L, R]
                k_emb = torch.einsum("vr,rbn->vbn", emb, roles) > 0
                k_err = torch.einsum("vlr,rbn->lvbn", err, roles) > 0
                k_feat = {l: torch.einsum("vfr,rbn->vbnf", torch.stack([e[2][l] for e in chunk]).float(), roles) > 0
                          for l in self.tcs}
                total[c: c + V, g.idx] = self._run(g, V, k_emb, k_err, k_feat)
        self.n_evaluations += len(enc)
        return total

    def _encode(self, node_set: Iterable[str]):
        """``(emb [R], err [L, R], {layer: feat [d_sae, R]})`` boolean masks of a node set over roles."""
        L, R = self.model.cfg.n_layers, len(ROLES)
        emb = torch.zeros(R, dtype=torch.bool)
        err = torch.zeros(L, R, dtype=torch.bool)
        fl, ff, fr = [], [], []
        for i in node_set:
            p = self._parsed.get(i)
            if p is None:
                p = self._parsed[i] = self._parse(i)
            if p is None:
                continue
            comp, layer, index, role = p
            r = _ROLE_INDEX[role]
            if comp == "embed":
                emb[r] = True
            elif comp == "error":
                err[layer, r] = True
            else:
                fl.append(layer)
                ff.append(index)
                fr.append(r)
        feat = {l: torch.zeros(tc.cfg.d_sae, R, dtype=torch.bool) for l, tc in self.tcs.items()}
        if fl:
            fl_t, ff_t, fr_t = torch.tensor(fl), torch.tensor(ff), torch.tensor(fr)
            for l in fl_t.unique().tolist():
                sel = fl_t == l
                feat[l][ff_t[sel], fr_t[sel]] = True
        return emb, err, feat

    def _run(self, g, V, k_emb, k_err, k_feat) -> Tensor:
        b, n = g.batch.tokens.shape
        L = self.model.cfg.n_layers
        live: dict[int, Tensor] = {}

        def rep(x):
            return x.repeat(V, *([1] * (x.ndim - 1)))

        def emb_fn(x, _):
            return torch.where(k_emb.reshape(V * b, n, 1), x, rep(g.abl_emb).to(x.dtype))

        def keep_in(l):
            def fn(x, _):
                live[l] = x
            return fn

        def mlp_fn(l):
            ke = k_err[l].reshape(V * b, n, 1)

            def fn(x, _):
                err = torch.where(ke, rep(g.clean_err[l]), rep(g.abl_err[l]))
                if l not in self.tcs:
                    return err.to(x.dtype)
                tc = self.tcs[l]
                acts = tc.encode(live.pop(l))
                kf = k_feat[l].reshape(V * b, n, -1)
                acts = torch.where(kf, acts, rep(g.abl_acts[l]))
                return (tc.decode(acts) + err).to(x.dtype)
            return fn

        hooks = [("hook_embed", emb_fn)]
        hooks += [(f"blocks.{l}.ln2.hook_normalized", keep_in(l)) for l in self.tcs]
        hooks += [(f"blocks.{l}.hook_mlp_out", mlp_fn(l)) for l in range(L)]
        return self._metric_with_hooks(g.batch, V, hooks)

    def _components_only(self, nodes: Sequence[str]) -> list[str]:
        return [i for i in nodes if self._parse(i) is not None]
