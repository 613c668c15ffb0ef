"""Evaluating feature circuits: ``m(C)`` with every transcoder feature, error node and embedding outside ``C``
ablated.

Node ids are role-keyed as in relation circuits (:func:`circuit_discovery.graph.role_key`):
``feature/L{l}/I{f}/{role}``, ``error/L{l}/{role}``, ``embed/L-1/{role}``; a node covers every position of a
prompt with that role.

**Feature nodes and error nodes (one definition, shared with the attribution graphs).** At each layer ``l`` and
position ``p`` the *feature nodes* are a chosen set ``F(p)`` of transcoder features (``feature_nodes``: by default
every feature at a non-BOS position; :meth:`FeatureCircuitEvaluator.from_graphs` uses exactly the features each
prompt's attribution graph visited). The **error node** of ``(l, p)`` is everything else the MLP writes there::

    error(l, p) = mlp_out(l, p) - x_l(p) @ skip - b_dec - sum_{f in F(p)} a_f W_dec[f]

i.e. the transcoder's reconstruction error *plus* the contribution of every feature that is not a node (features
not visited by the graph's cap, BOS features); the skip term only where the transcoder has an affine skip (it is
recomputed from the live input, like the features). For a cross-layer transcoder the sum runs over the feature
nodes of every layer ``s <= l`` with their decoders ``W_dec[s -> l]``; a feature node is keyed by the layer it
is encoded at and its ablation changes what it writes to every later layer. Any kind
:func:`~circuit_discovery.attribution.feature_graph.feature_graph` takes is accepted (read through the same
:class:`~circuit_discovery.attribution.feature_graph.DictionaryView`; other dictionaries raise its typed errors).
This is the error node of
:func:`circuit_discovery.attribution.feature_graph.feature_graph` (``FeatureGraphResult.errors``), so the same id
means the same vector in the graph and here. A layer without a transcoder has only its error node, the whole MLP output.

**Two evaluation modes** (``errors=``):

* ``"frozen"`` (the replacement model, default): each MLP output is ``b_dec + sum_{f in F} a'_f W_dec[f] +
  error``, where ``a'`` is the transcoder's encoding of the *live* MLP input (ablations upstream propagate) with
  the features outside ``C`` replaced by their ablation values, and the error node is held at its **clean** value
  (in ``C``) or its ablation value (not in ``C``);
* ``"live"`` (the real model, circuit-tracer's ``feature_intervention``): the real MLP runs on its live input and
  each ablated feature adds its decoder-direction delta ``(a_abl - a_live) W_dec[f]`` to the real output; an
  ablated error node is replaced by its ablation value; an error node in ``C`` is the live error
  ``mlp(x) - b_dec - sum_F a_f(x) W_dec[f]`` (it follows the circuit's own computation instead of injecting the
  clean run's). With every error node in ``C`` this is the real model with feature interventions only.

With an exact transcoder (zero error everywhere) the two modes coincide.

Ablation values: ``"corrupted"`` (default) -- the feature activations, errors and embeddings of the corrupted
prompt's run (ROME noise for noise pairs); ``"zero"`` -- zero. So ``m(N)`` is the clean metric and ``m(∅)`` the
fully ablated one (for ``"corrupted"`` exactly the corrupted run) in both modes, and ``f(N) = 1``, ``f(∅) = 0``.
The universe ``N`` holds every embedding and error node per role, and every feature node active (in the clean or
the ablation run) at some position of that role. :meth:`inert_nodes` are the nodes whose clean value equals their
ablation value on every prompt (ablating them is a no-op); :attr:`relevant_universe` is ``N`` without them, and
the curve (CPR/CMD) ranks over it with ``m(N)`` and ``m(∅)`` as references.

The interface matches :class:`~circuit_discovery.validation.ablation.CircuitEvaluator` (``metric_of``,
``faithfulness``, ``curve``, ``random_baseline``, ``completeness``, ``minimality``), so
:mod:`circuit_discovery.validation.curves` applies unchanged.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from circuit_discovery.attribution import PairInputs, check_pairs, noise_hook
from circuit_discovery.attribution.feature_graph import DictionaryView, dictionary_view
from circuit_discovery.errors import InputError
from circuit_discovery.facts.types import ROLES
from circuit_discovery.metrics import PromptBatch, batch_from_pairs, get_metric
from circuit_discovery.validation import curves
from circuit_discovery.validation.ablation import EvaluatorMethods, parse_component_id

__all__ = ["FeatureCircuitEvaluator", "FEATURE_ABLATIONS", "ERROR_MODES"]

FEATURE_ABLATIONS = ("corrupted", "zero")
ERROR_MODES = ("frozen", "live")
_ROLE_INDEX = {r: i for i, r in enumerate(ROLES)}


class _FGroup:
    """Equal-length pairs with their cached clean and ablation values (filled by FeatureCircuitEvaluator)."""

    batch: PromptBatch
    role_masks: dict[str, Tensor]  # role -> [b, n] bool
    role_stack: Tensor  # [R, b, n] float
    node_mask: dict[int, Tensor]  # layer -> [b, n, d_sae] bool: the features that are nodes
    clean_emb: Tensor
    clean_acts: dict[int, Tensor]  # layer -> transcoder activations [b, n, d_sae]
    clean_err: dict[int, Tensor]  # layer -> error node value [b, n, d_model]
    abl_emb: Tensor
    abl_acts: dict[int, Tensor]
    abl_err: dict[int, Tensor]

    def __init__(self, pairs, idx):
        self.pairs = [pairs[i] for i in idx]
        self.idx = idx


def _feature_node_spec(feature_nodes, pairs):
    """``None`` | ``("positional", [set((l, p, f)), ...])`` | ``("role", set((l, f, role)))``."""
    if feature_nodes is None:
        return None
    items = list(feature_nodes)
    if items and all(isinstance(x, str) for x in items):
        out = set()
        for i in items:
            comp, layer, index, role, _ = parse_component_id(i)
            if comp != "feature" or index is None or role is None:
                raise InputError(f"feature_nodes: {i!r} is not a role-keyed feature id like 'feature/L3/I7/last'")
            out.add((layer, index, role))
        return "role", out
    if len(items) != len(pairs):
        raise InputError(f"feature_nodes: give role-keyed feature ids, or one collection of (layer, position, "
                         f"feature) per pair ({len(pairs)} pairs, got {len(items)} entries)")
    per = []
    for s in items:
        try:
            per.append({(int(l), int(p), int(f)) for l, p, f in s})
        except (TypeError, ValueError):
            raise InputError("feature_nodes: each prompt's entry must hold (layer, position, feature) "
                             "triples") from None
    return "positional", per


class FeatureCircuitEvaluator(EvaluatorMethods):
    """``m(C)`` for feature circuits on fact pairs (see module docstring).

    Args:
        model: a HookedModel. transcoders: anything :func:`~circuit_discovery.attribution.feature_graph.feature_graph`
            takes (``{layer: transcoder}``, a ``TranscoderSet`` of per-layer transcoders with or without skip
            connections or of a cross-layer transcoder, any supported input hook). pairs: FactPairs.
        metric: a metric name or callable (as for :class:`CircuitEvaluator`).
        ablation: ``"corrupted"`` or ``"zero"``.
        errors: ``"frozen"`` (replacement model) or ``"live"`` (real MLPs plus feature deltas).
        feature_nodes: which features are nodes (the rest is folded into the error nodes): ``None`` = every
            feature at a non-BOS position (``include_bos=True``: BOS too); role-keyed feature ids
            (``feature/L{l}/I{f}/{role}``: that feature at every position of the role); or one collection of
            ``(layer, position, feature)`` per pair (e.g. the features each prompt's graph visited,
            :meth:`from_graphs`).
        max_batch: rows per forward pass (variants x prompts).
    """

    def __init__(self, model, transcoders: Any, pairs: Sequence, metric: Any = "logit_diff",
                 ablation: str = "corrupted", max_batch: int = 64, errors: str = "frozen",
                 feature_nodes: Any = None, include_bos: bool = False) -> None:
        if not pairs:
            raise InputError("FeatureCircuitEvaluator needs at least one fact pair")
        if ablation not in FEATURE_ABLATIONS:
            raise InputError(f"feature circuits support ablation {FEATURE_ABLATIONS}, got {ablation!r}")
        if errors not in ERROR_MODES:
            raise InputError(f"errors must be one of {ERROR_MODES} ('frozen': replacement model, 'live': real "
                             f"MLPs plus feature deltas), got {errors!r}")
        if isinstance(transcoders, Mapping) and not transcoders:
            raise InputError("FeatureCircuitEvaluator needs transcoders; train them with sae.train_transcoders")
        check_pairs(pairs)
        self.model, self.pairs = model, list(pairs)
        self.view: DictionaryView = dictionary_view(model, transcoders)
        self.tcs = {l: self.view.d_sae[l] for l in self.view.layers}  # source layer -> d_sae
        self._outs = set(self.view.out_layers)
        self.metric_fn = get_metric(metric)
        self.ablation = ablation
        self.errors = errors
        self.max_batch = int(max_batch)
        self.n_evaluations = 0
        spec = _feature_node_spec(feature_nodes, self.pairs)
        L = model.cfg.n_layers
        names = ["hook_embed"] + [f"blocks.{l}.hook_mlp_out" for l in range(L)] + \
                [self.view.in_hook(l) for l in self.tcs]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(self.pairs):
            by_len.setdefault(len(p.clean_tokens), []).append(i)
        self._groups: list[_FGroup] = []
        active: dict[tuple[int, str], set[int]] = {}
        for n, idx in sorted(by_len.items()):
            g = _FGroup(self.pairs, idx)
            g.batch = batch_from_pairs(model, g.pairs)
            b = len(idx)
            g.role_masks = {r: torch.tensor([[rr == r for rr in p.roles] for p in g.pairs], dtype=torch.bool)
                            for r in ROLES}
            g.role_stack = torch.stack([g.role_masks[r] for r in ROLES]).float()  # [R, b, n]
            g.node_mask = {}
            for l, d_sae in self.tcs.items():
                if spec is None:
                    m = torch.ones(b, n, d_sae, dtype=torch.bool)
                    if not include_bos:
                        m[g.role_masks["bos"]] = False
                elif spec[0] == "role":
                    m = torch.zeros(b, n, d_sae, dtype=torch.bool)
                    for (ll, f, r) in spec[1]:
                        if ll == l:
                            if not 0 <= f < d_sae:
                                raise InputError(f"feature_nodes: feature {f} out of range at layer {l}")
                            m[:, :, f] |= g.role_masks[r]
                else:
                    m = torch.zeros(b, n, d_sae, dtype=torch.bool)
                    for bi, pi in enumerate(idx):
                        for (ll, pp, f) in spec[1][pi]:
                            if ll == l:
                                if not (0 <= pp < n and 0 <= f < d_sae):
                                    raise InputError(f"feature_nodes: ({ll}, {pp}, {f}) out of range for pair {pi}")
                                m[bi, pp, f] = True
                g.node_mask[l] = m
            with torch.no_grad():
                _, clean = model.run_with_cache(g.batch.tokens, names=names, attention_mask=g.batch.mask,
                                                return_logits=False)
                g.clean_emb = clean["hook_embed"]
                g.clean_acts = self._acts(clean)
                g.clean_err = self._errors(clean, g.clean_acts, g.node_mask)
                if ablation == "corrupted":
                    cb = batch_from_pairs(model, g.pairs, corrupted=True)
                    noise = PairInputs.from_pairs(model, g.pairs).noise
                    with model.hooks(noise_hook(noise)):
                        _, corr = model.run_with_cache(cb.tokens, names=names, attention_mask=cb.mask,
                                                       return_logits=False)
                    g.abl_emb = corr["hook_embed"]
                    g.abl_acts = self._acts(corr)
                    g.abl_err = self._errors(corr, g.abl_acts, g.node_mask)
                else:
                    g.abl_emb = torch.zeros_like(clean["hook_embed"])
                    g.abl_acts = {l: torch.zeros_like(a) for l, a in g.clean_acts.items()}
                    g.abl_err = {l: torch.zeros_like(e) for l, e in g.clean_err.items()}
            for l in self.tcs:
                on = ((g.clean_acts[l] != 0) | (g.abl_acts[l] != 0)) & g.node_mask[l]  # [b, n, d_sae]
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
        self._inert: list[str] | None = None

    # ------------------------------------------------------------------ construction helpers
    def _acts(self, cache) -> dict[int, Tensor]:
        """Feature activations ``{source layer: [b, n, d_sae]}`` (float32) from a run's cached transcoder inputs."""
        return {l: self.view.encode(l, cache[self.view.in_hook(l)]) for l in self.tcs}

    def _errors(self, cache, acts: Mapping[int, Tensor], node_mask: Mapping[int, Tensor]) -> dict[int, Tensor]:
        """Each layer's error node value: ``mlp_out - x @ skip - b_dec - sum over feature nodes writing there of
        a_f W_dec[f]`` (every source layer's for a cross-layer transcoder; the whole MLP output where nothing
        writes)."""
        out = {}
        masked = {l: a * node_mask[l] for l, a in acts.items()}
        for t in range(self.model.cfg.n_layers):
            y = cache[f"blocks.{t}.hook_mlp_out"].float()
            if t in self._outs:
                y = y - self.view.decode_to(t, masked)
                sk = self.view.skip_out(t, cache[self.view.in_hook(t)]) if t in self.view.skip else None
                if sk is not None:
                    y = y - sk
            out[t] = y
        return out

    @classmethod
    def from_graphs(cls, model, transcoders: Mapping[int, Any], pairs: Sequence, graphs: Sequence, **kwargs):
        """An evaluator whose feature nodes on each pair are exactly the features its attribution graph visited
        (``graphs[i]``: a :class:`~circuit_discovery.attribution.feature_graph.FeatureGraphResult` or its ``graph`` for
        ``pairs[i]``), so error nodes mean the same vectors as in the graphs."""
        if len(graphs) != len(pairs):
            raise InputError(f"from_graphs: one graph per pair ({len(pairs)} pairs, {len(graphs)} graphs)")
        nodes = []
        for g in graphs:
            g = getattr(g, "graph", g)
            nodes.append([(nd.node.layer, nd.node.position, nd.node.index) for nd in g.nodes
                          if nd.node.component == "feature"])
        return cls(model, transcoders, pairs, feature_nodes=nodes, **kwargs)

    def with_errors(self, errors: str) -> FeatureCircuitEvaluator:
        """The same evaluator (shared caches) in the other error mode (``"frozen"`` or ``"live"``)."""
        if errors not in ERROR_MODES:
            raise InputError(f"errors must be one of {ERROR_MODES}, got {errors!r}")
        other = copy.copy(self)
        other.errors = errors
        return other

    @property
    def universe(self) -> list[str]:
        return list(self._universe)

    # ------------------------------------------------------------------ inert nodes, relevant universe
    def inert_nodes(self) -> list[str]:
        """Universe nodes whose clean value equals (``torch.equal``) their ablation value at every position they
        cover on every prompt: ablating them is a no-op (BOS, positions before the first token where clean and
        corrupted prompts differ, embeddings of identical tokens)."""
        if self._inert is None:
            moving: set[str] = set()
            L = self.model.cfg.n_layers
            for g in self._groups:
                for r, m in g.role_masks.items():
                    if not m.any():
                        continue
                    if (g.clean_emb != g.abl_emb)[m].any():
                        moving.add(f"embed/L-1/{r}")
                    for l in range(L):
                        if (g.clean_err[l] != g.abl_err[l])[m].any():
                            moving.add(f"error/L{l}/{r}")
                    for l in self.tcs:
                        diff = (g.clean_acts[l] != g.abl_acts[l]) & g.node_mask[l]
                        for f in diff[m].any(0).nonzero().flatten().tolist():
                            moving.add(f"feature/L{l}/I{f}/{r}")
            self._inert = [i for i in self._universe if i not in moving]
        return list(self._inert)

    def _find_inert_nodes(self) -> list[str]:  # the EvaluatorMethods hook
        return self.inert_nodes()

    @property
    def relevant_universe(self) -> list[str]:
        """The universe without :meth:`inert_nodes`, in universe order."""
        inert = set(self.inert_nodes())
        return [i for i in self._universe if i not in inert]

    def baseline_node_sets(self) -> dict[str, list[str]]:
        """Node sets evaluated like any circuit: ``embeddings_and_errors`` (every embedding and error node, every
        feature ablated) and ``features_only`` (every embedding and feature node, every error node ablated)."""
        emb = [i for i in self._universe if i.startswith("embed/")]
        return {"embeddings_and_errors": emb + [i for i in self._universe if i.startswith("error/")],
                "features_only": emb + [i for i in self._universe if i.startswith("feature/")]}

    def curve(self, ranked_nodes: Sequence[str], *, relevant_only: bool = True, m_full: float | None = None,
              m_empty: float | None = None, **kwargs) -> curves.FaithfulnessCurve:
        """Faithfulness curve (CPR/CMD) over the whole (relevant) universe: ``ranked_nodes`` first (those in it),
        then the remaining nodes in universe order, so the x-axis is a fraction of ``N`` and 100% is ``m(N)``;
        normalised by ``m(N)`` and ``m(∅)`` (evaluated when not given)."""
        base = self.relevant_universe if relevant_only else list(self._universe)
        inbase = set(base)
        ranked = list(dict.fromkeys(i for i in self._components_only(ranked_nodes) if i in inbase))
        seen = set(ranked)
        ranked += [i for i in base if i not in seen]
        if m_full is None or m_empty is None:
            mf, me = self.references()
            m_full = mf if m_full is None else m_full
            m_empty = me if m_empty is None else m_empty
        return curves.faithfulness_curve(ranked, self.metric_of, batched=True, m_full=m_full, m_empty=m_empty,
                                         **kwargs)

    def active_features(self, pair_index: int) -> list[str]:
        """Role-keyed ids of the feature nodes active (non-zero in the clean or the ablation run) at some position
        of pair ``pair_index`` (universe order)."""
        for g in self._groups:
            if pair_index in g.idx:
                bi = g.idx.index(pair_index)
                on: set[str] = set()
                for l in self.tcs:
                    act = ((g.clean_acts[l][bi] != 0) | (g.abl_acts[l][bi] != 0)) & g.node_mask[l][bi]  # [n, d_sae]
                    for r, m in g.role_masks.items():
                        if m[bi].any():
                            on.update(f"feature/L{l}/I{f}/{r}" for f in act[m[bi]].any(0).nonzero().flatten().tolist())
                return [i for i in self._universe if i in on]
        raise InputError(f"pair index {pair_index} out of range 0..{len(self.pairs) - 1}")

    def error_vectors(self, pair_index: int, which: str = "clean") -> Tensor:
        """``[n_layers, n_tokens, d_model]`` value of the error node at each layer and position of one pair
        (``which``: ``"clean"`` or ``"ablated"``)."""
        for g in self._groups:
            if pair_index in g.idx:
                bi = g.idx.index(pair_index)
                src = g.clean_err if which == "clean" else g.abl_err
                return torch.stack([src[l][bi] for l in range(self.model.cfg.n_layers)])
        raise InputError(f"pair index {pair_index} out of range 0..{len(self.pairs) - 1}")

    # ------------------------------------------------------------------ evaluation
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
            if index is None or not 0 <= index < self.tcs[layer]:
                raise InputError(f"node {node_id!r}: feature index missing or out of range")
        return comp, layer, index, role

    def metric_per_prompt(self, node_sets: Sequence[Iterable[str]]) -> Tensor:
        """``[len(node_sets), n_pairs]`` metric of each prompt (in ``pairs`` order) with each node set."""
        encs = [self._encode(s) for s in node_sets]
        return self._evaluate([[e] * len(self.pairs) for e in encs])

    def metric_per_prompt_paired(self, node_sets: Sequence[Sequence[Iterable[str]]]) -> Tensor:
        """``[V, n_pairs]``: ``node_sets[v][i]`` is the node set of prompt ``i`` in variant ``v`` (e.g. random
        feature sets drawn per prompt), evaluated in one batch."""
        rows = []
        for v in node_sets:
            v = list(v)
            if len(v) != len(self.pairs):
                raise InputError(f"metric_per_prompt_paired: each variant needs one node set per pair "
                                 f"({len(self.pairs)}), got {len(v)}")
            rows.append([self._encode(s) for s in v])
        return self._evaluate(rows)

    def _evaluate(self, rows) -> Tensor:
        total = torch.zeros(len(rows), len(self.pairs), dtype=torch.float64)
        if not rows:
            return total
        for g in self._groups:
            b, n = g.batch.tokens.shape
            roles = g.role_stack  # [R, b, n] float
            per = max(1, self.max_batch // b)
            for c in range(0, len(rows), per):
                chunk = rows[c: c + per]
                V = len(chunk)
                emb = torch.stack([torch.stack([row[i][0] for i in g.idx]) for row in chunk]).float()  # [V, b, R]
                err = torch.stack([torch.stack([row[i][1] for i in g.idx]) for row in chunk]).float()  # [V, b, L, R]
                k_emb = torch.einsum("vbr,rbn->vbn", emb, roles) > 0
                k_err = torch.einsum("vblr,rbn->lvbn", err, roles) > 0
                k_feat = {}
                for l in self.tcs:
                    fe = torch.stack([torch.stack([row[i][2][l] for i in g.idx]) for row in chunk]).float()
                    k_feat[l] = torch.einsum("vbfr,rbn->vbnf", fe, roles) > 0
                total[c: c + V, g.idx] = self._run(g, V, k_emb, k_err, k_feat)
        self.n_evaluations += len(rows)
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
        feat = {l: torch.zeros(d_sae, R, dtype=torch.bool) for l, d_sae in self.tcs.items()}
        if fl:
            fl_t, ff_t, fr_t = torch.tensor(fl), torch.tensor(ff), torch.tensor(fr)
            for l in fl_t.unique().tolist():
                sel = fl_t == l
                feat[l][ff_t[sel], fr_t[sel]] = True
        return emb, err, feat

    def _run(self, g, V, k_emb, k_err, k_feat) -> Tensor:
        b, n = g.batch.tokens.shape
        L = self.model.cfg.n_layers
        view = self.view
        live_mode = self.errors == "live"
        live: dict[int, Tensor] = {}
        acts: dict[int, Tensor] = {}  # source layer -> the activations used (kept live or ablated, node mask)
        acts_live: dict[int, Tensor] = {}  # source layer -> live activations on the node mask

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
                if l not in self._outs:
                    kept = x if live_mode else rep(g.clean_err[l]).to(x.dtype)
                    return torch.where(ke, kept, rep(g.abl_err[l]).to(x.dtype))
                x_in = live.pop(l) if l in live else None
                if l in self.tcs:
                    assert x_in is not None  # the input hook runs before the output hook of the same layer
                    nm = rep(g.node_mask[l])
                    a_live = view.encode(l, x_in)
                    kf = k_feat[l].reshape(V * b, n, -1)
                    acts[l] = torch.where(kf, a_live, rep(g.abl_acts[l])) * nm
                    acts_live[l] = a_live * nm
                sk = view.skip_out(l, x_in) if x_in is not None and l in view.skip else None
                # live mode: the real MLP output minus its skip term and its own feature-node part (the live error)
                if live_mode:
                    kept = x.float() - view.decode_to(l, acts_live) - (sk if sk is not None else 0.0)
                else:
                    kept = rep(g.clean_err[l]).float()
                err = torch.where(ke, kept, rep(g.abl_err[l]).float())
                out = view.decode_to(l, acts) + err
                return (out + sk if sk is not None else out).to(x.dtype)
            return fn

        hooks = [("hook_embed", emb_fn)]
        hooks += [(view.in_hook(l), keep_in(l)) for l in self.tcs]
        hooks += [(f"blocks.{l}.hook_mlp_out", mlp_fn(l)) for l in range(L)]
        return self._metric_with_hooks(g.batch, V, hooks)

    def _components_only(self, nodes: Sequence[str]) -> list[str]:
        return [i for i in nodes if self._parse(i) is not None]
