"""Feature attribution graphs over transcoder features (the circuit-tracer approach).

For one prompt, the *local replacement model* is the model with

* every MLP output (``blocks.{l}.hook_mlp_out``) replaced by what the dictionaries write there plus an **error
  node** per (layer, position) holding what they miss -- a layer nothing writes to keeps its whole MLP output as
  the error node. The dictionaries are a :class:`TranscoderSet` (or ``{layer: transcoder}``, per-layer with the
  default hooks), read through :class:`DictionaryView`
  (:mod:`circuit_discovery.attribution.dictionary_view`):

  - per-layer transcoders reading ``blocks.{l}.mlp.hook_in`` (the MLP norm's output), ``blocks.{l}.ln2.hook_normalized``
    (its input normalised before the gain) or ``blocks.{l}.hook_resid_mid`` (:data:`IN_HOOKS`);
  - **affine skip connections** (``skip [d_in, d_out]``, Gemma Scope 2 / circuit-tracer ``W_skip``): the skip term
    ``x_l @ skip`` is recomputed in every pass from that pass's own transcoder input, which under the frozen
    norms and attention is linear in the upstream sources. It is therefore neither a node nor part of the error
    node: its contribution flows as *direct paths* through the edges of the sources that feed ``x_l`` (an edge
    ``s -> t`` includes ``s``'s effect on ``t`` via every skip term in between), and exactness is unchanged;
  - a **cross-layer transcoder**: a feature encoded at layer ``s`` writes ``a * W_dec[s -> t][f]`` to every layer
    ``t >= s``; the error node of ``(t, p)`` is what the CLT misses at layer ``t``;
  - ReLU, JumpReLU and TopK with or without ReLU: a feature's activation is the dictionary's own ``encode`` on the
    prompt (TopK's selection frozen like the attention pattern); only its *input* (pre-activation) is a target.
* every normalisation scale (RMSNorm / LayerNorm, incl. the final norm and Gemma's post-norms) and every
  attention pattern (queries and keys) **frozen** at their values on the prompt.

Given the prompt, that model is affine in its sources -- token embeddings, feature activations, error
vectors -- up to each feature's pre-activation and each logit. An edge ``source -> target`` is the
source's direct effect on the target's input::

    A[target, source] = a_source * sum_t (W_dec[s -> t][source] . d input_target / d mlp_out(t, p))  (feature)
                      = e(l, p) . d input_target / d mlp_out(l, p)                             (error source)
                      = emb(p) . d input_target / d hook_embed(p)                             (embedding source)

where ``input_target`` is ``x_l(p) . W_enc[:, f]`` for a feature ``f`` at layer ``l``, position ``p``
(its pre-activation minus ``b_enc``) and ``h_last . (W_U[t] - mean W_U)`` for a logit (before any soft
cap). Because the replacement is affine, ``input(target) = sum_s A[target, s] + bias(target)``, where
``bias`` is the target's input with every source set to zero (``b_dec``, norm biases, the skip terms of what
remains). Edges are computed in batched backward passes through one kept forward pass.

Only the ``max_feature_nodes`` most influential active features become nodes: rows are computed first for
the logit nodes, then for features in order of their estimated influence on the logits (through the rows
computed so far), a batch at a time. The contribution of active features that are not visited is added
to the error node of each (layer, position) they write to (for a CLT, split per target layer from the kept
gradients), so the graph stays exact -- every node's input is still the sum of its incoming edges plus its bias.
BOS features are folded into the error nodes the same way (``include_bos=False``, default: the BOS residual is an
outlier that transcoders are not trained on). An error node is therefore *everything written at (layer, position)
except ``b_dec``, the skip term and the visited features' decoder contributions* (``FeatureGraphResult.errors``);
the circuit evaluator (:class:`~circuit_discovery.validation.features.FeatureCircuitEvaluator.from_graphs`) uses
the same definition. :func:`graph_scores` gives circuit-tracer's replacement and completeness scores of a graph.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from circuit_discovery.attribution.dictionary_view import (  # exported from here too
    IN_HOOKS,
    OUT_HOOKS,
    DictionaryView,
    FrozenReplay,
    TranscoderDict,
    as_transcoder_set,
    dictionary_view,
)
from circuit_discovery.errors import InputError
from circuit_discovery.graph.graph import AttributionGraph, NodeInfo
from circuit_discovery.models.arch import get_module
from circuit_discovery.models.hooked import frozen
from circuit_discovery.nodes import Node
from circuit_discovery.sae.labels import direction_logit_effects

__all__ = ["FrozenReplay", "FeatureGraphResult", "FeatureCircuitResult", "DictionaryView", "IN_HOOKS", "OUT_HOOKS",
           "TranscoderDict",
           "as_transcoder_set", "decoder_directions", "dictionary_view", "feature_circuit", "feature_graph",
           "graph_scores", "replacement_inputs"]


# ------------------------------------------------------------------------------------- the prompt's state
@dataclass
class _PromptState:
    tokens: Tensor  # [1, n]
    n: int
    emb: Tensor  # [n, d]
    mlp_out: dict[int, Tensor]  # layer -> [n, d]: what the replacement writes besides the skip term (the MLP's
    #                             output minus x @ skip; the whole output without a skip)
    x_in: dict[int, Tensor]  # transcoder layer -> [n, d_in] transcoder input
    acts: dict[int, Tensor]  # transcoder layer -> [n, d_sae] activations
    normed_last: Tensor  # [d] final-normed residual at the last position
    logits_last: Tensor  # [vocab] real logits at the last position
    mlp_true: dict[int, Tensor] = field(default_factory=dict)  # layer -> [n, d] the MLP block's real output


def _prompt_state(model, tokens: Tensor, transcoders: Any, replay: FrozenReplay) -> _PromptState:
    view = dictionary_view(model, transcoders)
    L = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    names += [view.in_hook(l) for l in view.layers]
    cache: dict[str, Tensor] = {}

    def save(x, name):
        cache[name] = x.detach()

    with torch.no_grad():
        with model.hooks([(n, save) for n in names]):
            h = model.final_hidden(tokens)
        with replay.recording(), model.hooks([]):
            model.final_hidden(tokens)
        logits = model.unembed(h[0, -1])
    acts = {}
    x_in = {}
    for l in view.layers:
        x = cache[view.in_hook(l)][0].float()
        x_in[l] = x
        with torch.no_grad():
            acts[l] = view.encode(l, x)
    mlp_true = {l: cache[f"blocks.{l}.hook_mlp_out"][0].float() for l in range(L)}
    mlp_out = {}
    for l in range(L):
        sk = view.skip_out(l, x_in[l]) if l in x_in else None
        mlp_out[l] = mlp_true[l] - sk if sk is not None else mlp_true[l]
    return _PromptState(tokens=tokens, n=tokens.shape[1], emb=cache["hook_embed"][0].float(), mlp_out=mlp_out,
                        x_in=x_in, acts=acts, normed_last=h[0, -1].float(), logits_last=logits.float(),
                        mlp_true=mlp_true)


def replacement_inputs(model, tokens: Tensor, replay: FrozenReplay, emb: Tensor, mlp_out: Mapping[int, Tensor],
                       transcoders: Any, requires_grad: bool = False):
    """One pass of the frozen replacement model over ``tokens`` [B, n] with the given sources.

    ``emb`` [B, n, d] replaces ``hook_embed``; ``blocks.{l}.hook_mlp_out`` becomes ``mlp_out[l]`` [B, n, d] plus,
    where layer ``l``'s transcoder has a skip connection, the skip term ``x_l @ skip`` of this pass's own
    transcoder input (linear in the sources under the replay, so it stays part of the affine network). Returns
    ``(x_in, final)``: ``x_in[l]`` [B, n, d_in] the transcoder inputs (so a feature's input is
    ``x_in[l][:, p] @ W_enc[:, f]``) and ``final`` [B, n, d] the final-normed residual. Norm scales and attention
    queries/keys are replayed from ``replay``'s recording; a transcoder reading ``ln2.hook_normalized`` gets the
    MLP norm's input times its replayed scale.
    """
    view = dictionary_view(model, transcoders)
    store: dict[int, Tensor] = {}

    def put(l, value):
        def fn(act, name):
            out = value
            if l in view.skip and l in store:
                out = out + store[l].float() @ view.skip[l]
            return out.to(act.dtype)
        return fn

    def keep(l, ln2=None):
        def fn(act, name):
            store[l] = act if ln2 is None else replay.normalize(ln2, act)
        return fn

    hooks = [("hook_embed", put(-1, emb))]
    for l in view.layers:
        if view.in_kind == "mlp_in":
            hooks.append((f"blocks.{l}.mlp.hook_in", keep(l)))
        elif view.in_kind == "normalized":
            hooks.append((f"blocks.{l}.hook_mlp_in", keep(l, get_module(model._layers[l], model.spec.ln2))))
        else:
            hooks.append((f"blocks.{l}.hook_mlp_in", keep(l)))
    hooks += [(f"blocks.{l}.hook_mlp_out", put(l, v)) for l, v in mlp_out.items()]
    with torch.set_grad_enabled(requires_grad), frozen(model), replay.replaying(), model.hooks(hooks):
        final = model.final_hidden(tokens)
    return store, final


# ------------------------------------------------------------------------------------- the graph
@dataclass
class FeatureGraphResult:
    graph: AttributionGraph
    bias: Tensor  # [n_nodes] input of each node with all sources at zero (0 for sources)
    node_input: Tensor  # [n_nodes] the node's actual input (pre-activation minus b_enc; logit) (0 for sources)
    n_active_features: int
    n_visited: int
    logit_tokens: list[int]
    errors: Tensor | None = None  # [n_layers, n, d] each error node's vector (what the MLP writes there minus
    #                               b_dec and the visited features' decoder contributions)

    def scores(self) -> dict[str, float | None]:
        """:func:`graph_scores` of this graph (replacement, completeness, error influence share)."""
        return graph_scores(self.graph)


def _logit_targets(model, state: _PromptState, max_n_logits: int, desired_logit_prob: float,
                   extra: Sequence[int]) -> tuple[list[int], Tensor]:
    probs = torch.softmax(state.logits_last.double(), -1)
    order = torch.argsort(probs, descending=True)
    cum = torch.cumsum(probs[order], 0)
    n = int(min(max_n_logits, int((cum < desired_logit_prob).sum()) + 1))
    toks = order[:n].tolist()
    for t in extra:
        if t is not None and int(t) not in toks:
            toks.append(int(t))
    return toks, probs[toks].float()


def _checked_transcoders(model, transcoders: Any, max_feature_nodes: int, batch_size: int) -> DictionaryView:
    """``transcoders`` as a checked :class:`DictionaryView` (layers, kinds, hooks), after checking the limits."""
    view = dictionary_view(model, transcoders)
    if max_feature_nodes < 0 or batch_size <= 0:
        raise InputError("max_feature_nodes must be >= 0 and batch_size > 0")
    return view


def _prompt_tokens(model, prompt: str | Sequence[int] | Tensor) -> tuple[Tensor, str]:
    """``prompt`` as token ids [1, n] on the model's device (BOS prepended to text), and its text."""
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)
        text = prompt
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        text = model.tokenizer.decode(tokens[0].tolist())
    return tokens.to(model.device), text


def _feature_input(x: Tensor, view: DictionaryView, l: int, f: int) -> Tensor:
    """Feature ``f``'s input at layer ``l`` (pre-activation minus ``b_enc``) from its transcoder input ``x`` [d_in]."""
    return x.float() @ view.W_enc[l][:, f]


def _logit_input(h: Tensor, W_U: Tensor, u_mean: Tensor, t: int) -> Tensor:
    """Token ``t``'s logit input from the final-normed residual ``h`` [d]: ``h . (W_U[t] - mean W_U)``."""
    return h.float() @ (W_U[t] - u_mean)


@dataclass
class _Sources:
    """The candidate source columns of one prompt: active features, then error nodes (layer-major, ``L x n``),
    then embeddings (``n``).

    ``layer``/``pos``/``feat``/``act`` list the active features (also as tensors ``*_t``); ``errors`` [L, n, d]
    is each error node's vector: the MLP output minus the transcoder's reconstruction (all active features and
    ``b_dec``), or the whole MLP output where a layer has no transcoder; BOS features are in the BOS error node
    unless ``include_bos``. Unvisited features are folded in later (:func:`_assemble`).
    """
    layer: list[int]
    pos: list[int]
    feat: list[int]
    act: list[float]
    errors: Tensor
    n_layers: int
    n: int
    layer_t: Tensor = field(init=False)
    pos_t: Tensor = field(init=False)
    feat_t: Tensor = field(init=False)
    act_t: Tensor = field(init=False)

    def __post_init__(self):
        self.layer_t, self.pos_t, self.feat_t = (torch.tensor(v) for v in (self.layer, self.pos, self.feat))
        self.act_t = torch.tensor(self.act, dtype=torch.float32)

    @property
    def n_feat(self) -> int:
        return len(self.layer)

    @property
    def err_off(self) -> int:
        """Column of the first error node."""
        return self.n_feat

    @property
    def emb_off(self) -> int:
        """Column of the first embedding."""
        return self.n_feat + self.n_layers * self.n

    @property
    def n_cols(self) -> int:
        return self.emb_off + self.n


def _active_sources(st: _PromptState, view: DictionaryView, n_layers: int, include_bos: bool) -> _Sources:
    """Phase 1: the active features of every transcoder layer (BOS excluded unless ``include_bos``) and the error
    vectors: what the replacement writes at (layer, position) besides the skip term, minus ``b_dec`` and every
    active feature's decoder contribution (from every source layer, for a cross-layer transcoder)."""
    feat_l, feat_p, feat_f, feat_a = [], [], [], []
    first = 0 if include_bos else 1
    for l, a in st.acts.items():
        pp, ff = (a[first:] != 0).nonzero(as_tuple=True)
        feat_l += [l] * len(pp)
        feat_p += (pp + first).tolist()
        feat_f += ff.tolist()
        feat_a += a[pp + first, ff].tolist()
    outs = set(view.out_layers)
    errors = torch.stack([st.mlp_out[t] - view.decode_to(t, st.acts) if t in outs else st.mlp_out[t].clone()
                          for t in range(n_layers)])  # [L, n, d] true reconstruction errors
    if not include_bos:  # BOS features are folded into the BOS error node
        for t in outs:
            errors[t, 0] = st.mlp_out[t][0] - view.b_dec[t]
    return _Sources(feat_l, feat_p, feat_f, feat_a, errors, n_layers, st.n)


class _RowComputer:
    """Rows of the adjacency matrix (direct effects of every source on a target) from one kept forward pass.

    One forward pass of the frozen replacement model (batch 1) with zero-valued leaves at the sources; its
    graph is kept, and each batch of targets is one vmapped backward (``is_grads_batched``) through it. The
    network is affine in the sources under the replay, so every target's row comes from the same forward
    (3-4x faster than a forward of B copies of the prompt per batch). A feature's entry sums its effect through
    every layer it writes to; for a cross-layer transcoder each row's gradients at the MLP outputs are kept
    (``grads``), so that unvisited features can be folded into the error node of each layer they write to.
    """

    def __init__(self, model, st: _PromptState, src: _Sources, view: DictionaryView, replay: FrozenReplay):
        L, n, d = model.cfg.n_layers, st.n, model.cfg.d_model
        self.st, self.src, self.view, self.d = st, src, view, d
        self.W_U = model.W_U.detach().float()
        self.u_mean = self.W_U.mean(0)
        d_e = torch.zeros(1, n, d, requires_grad=True)
        d_m = {l: torch.zeros(1, n, d, requires_grad=True) for l in range(L)}
        self.x_in, self.final = replacement_inputs(model, st.tokens, replay, st.emb[None] + d_e,
                                                   {l: st.mlp_out[l][None] + d_m[l] for l in range(L)},
                                                   view, requires_grad=True)
        self.leaves = [d_e] + [d_m[l] for l in range(L)]
        self.sel_of = {l: (src.layer_t == l).nonzero().flatten() for l in view.layers}  # active-feature columns
        # the active features of each layer grouped by position: (position, their indices within sel_of[l])
        self.by_pos = {l: [(int(p), (src.pos_t[sel] == p).nonzero().flatten()) for p in src.pos_t[sel].unique()]
                       for l, sel in self.sel_of.items()}
        self._dec: dict[int, Tensor] = {}
        self.keep_grads = view.clt is not None
        self.grads: list[Tensor] = []  # [B, L, n, d] per rows() call (cross-layer transcoders only)

    def dec_block(self, s: int) -> Tensor:
        """``[S, T * d]``: the decoder rows of layer ``s``'s active features to each of their ``T`` target layers,
        concatenated; cached for per-layer sets, gathered per call for a cross-layer transcoder (whose blocks for
        all layers would take hundreds of MB)."""
        if s in self._dec:
            return self._dec[s]
        feat = self.src.feat_t[self.sel_of[s]]
        if self.view.clt is not None:  # W_dec[s]: [d_sae, T, d]
            return self.view.clt.W_dec[s].detach()[feat].float().reshape(len(feat), -1)
        block = self.view.dec(s, s)[feat]
        self._dec[s] = block
        return block

    def _target_input(self, kind: str, j: int) -> Tensor:
        if kind == "logit":
            return _logit_input(self.final[0, -1], self.W_U, self.u_mean, j)
        l, p, f = self.src.layer[j], self.src.pos[j], self.src.feat[j]
        return _feature_input(self.x_in[l][0, p], self.view, l, f)

    def rows(self, targets: list[tuple[str, int]]) -> Tensor:
        """Rows [len(targets), n_cols] of direct effects on each target ('logit', token) / ('feat', j)."""
        src, st = self.src, self.st
        B, n, d = len(targets), st.n, self.d
        outs = [self._target_input(kind, j) for kind, j in targets]
        grads = torch.autograd.grad(torch.stack(outs), self.leaves, grad_outputs=torch.eye(B), retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        g_e = grads[0][:, 0] if grads[0] is not None else torch.zeros(B, n, d)
        g_m = [g[:, 0] if g is not None else torch.zeros(B, n, d) for g in grads[1:]]
        rows = torch.zeros(B, src.n_cols, dtype=torch.float32)
        rows[:, src.emb_off:] = (g_e * st.emb[None]).sum(-1)
        for l in range(src.n_layers):
            rows[:, src.err_off + l * n: src.err_off + (l + 1) * n] = (g_m[l] * src.errors[l][None]).sum(-1)
        G = torch.stack(g_m, 1)  # [B, L, n, d]
        for s in self.view.layers:
            sel = self.sel_of[s]
            if len(sel) == 0:
                continue
            tg = self.view.targets(s)  # consecutive layers
            D = self.dec_block(s)  # [S, T * d]
            # gradient at each active feature's position . its decoder rows, summed over the layers it writes to:
            # one matmul per position over the concatenated targets
            total = torch.empty(B, len(sel))
            for p, j in self.by_pos[s]:
                total[:, j] = G[:, tg[0]: tg[-1] + 1, p].reshape(B, -1) @ D[j].T
            rows[:, sel] = total * src.act_t[sel][None]
        if self.keep_grads:
            self.grads.append(G.detach())
        return rows.detach()


def _visit_features(rc: _RowComputer, logit_toks: list[int], logit_probs: Tensor, max_feature_nodes: int,
                    batch_size: int, progress: bool) -> tuple[Tensor, list[int], list[Tensor]]:
    """Phase 3: the logit nodes' rows, then the rows of the active features in order of their estimated influence
    on the logits through the rows computed so far, ``batch_size`` at a time, up to ``max_feature_nodes``.

    Returns ``(logit_rows, visited, feat_rows)``: ``visited`` the feature indices in visiting order and
    ``feat_rows`` their rows, one tensor per batch."""
    n_feat = rc.src.n_feat
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=min(max_feature_nodes, n_feat) + len(logit_toks), desc="feature graph", unit="node",
                   dynamic_ncols=True)
    logit_rows = rc.rows([("logit", t) for t in logit_toks])
    if bar:
        bar.update(len(logit_toks))
    visited: list[int] = []
    feat_rows: list[Tensor] = []
    is_visited = torch.zeros(n_feat, dtype=torch.bool)
    w_logit = logit_probs.double()
    while len(visited) < min(max_feature_nodes, n_feat):
        infl = _column_influence(logit_rows, w_logit, torch.cat(feat_rows) if feat_rows else None, visited)
        cand = infl[:n_feat].clone()
        cand[is_visited] = -1.0
        k = min(batch_size, max_feature_nodes - len(visited), int((~is_visited).sum()))
        top = torch.topk(cand, k).indices.tolist()
        feat_rows.append(rc.rows([("feat", j) for j in top]))
        visited += top
        is_visited[top] = True
        if bar:
            bar.update(len(top))
    if bar:
        bar.close()
    return logit_rows, visited, feat_rows


def _assemble(src: _Sources, view: DictionaryView, logit_rows: Tensor, visited: list[int], feat_rows: list[Tensor],
              grads: Sequence[Tensor] = ()) -> Tensor:
    """Phase 4: the adjacency [n_nodes, n_nodes] (rows are targets) in node order: visited features, error nodes,
    embeddings, logits.

    Each unvisited feature is folded into the error node of every (layer, position) it writes to -- its decoder
    contribution is added to the error vector (``src.errors``, updated in place) and its effect on each target
    to that error node's column -- which keeps the graph exact. For per-layer transcoders that is the feature's
    column added to its own layer's error column; for a cross-layer transcoder the per-layer split comes from
    the kept gradients (``grads``: ``[B, L, n, d]`` per rows() call, logits first, as computed)."""
    L, n = src.n_layers, src.n
    is_visited = torch.zeros(src.n_feat, dtype=torch.bool)
    is_visited[visited] = True
    R_all = torch.cat(feat_rows + [logit_rows], 0)  # targets: visited features, then logits
    rest = (~is_visited).nonzero().flatten()
    if len(rest) and view.clt is None:
        err_cols = src.err_off + src.layer_t[rest] * n + src.pos_t[rest]
        R_all.index_add_(1, err_cols, R_all[:, rest])
        # the error node's vector: reconstruction error + the decoder contributions of the folded features
        for l in view.layers:
            sel = rest[src.layer_t[rest] == l]
            if len(sel):
                contrib = src.act_t[sel][:, None] * view.dec(l, l)[src.feat_t[sel]]
                src.errors[l].index_add_(0, src.pos_t[sel], contrib)
    elif len(rest):
        U = torch.zeros_like(src.errors)  # [L, n, d] what the unvisited features write at each (layer, position)
        for s in view.layers:
            sel = rest[src.layer_t[rest] == s]
            if len(sel):
                a = src.act_t[sel][:, None]
                for t in view.targets(s):
                    U[t].index_add_(0, src.pos_t[sel], a * view.dec(s, t)[src.feat_t[sel]])
        src.errors += U
        G = torch.cat(list(grads[1:]) + [grads[0]], 0)  # rows in R_all's order: features, then logits
        R_all[:, src.err_off: src.err_off + L * n] += torch.einsum("rlnd,lnd->rln", G, U).reshape(len(G), L * n)
    n_vis, n_logits = len(visited), logit_rows.shape[0]
    vis = torch.tensor(visited, dtype=torch.long)
    src_cols = torch.cat([vis, torch.arange(src.err_off, src.n_cols)])  # visited features, errors, embeddings
    n_nodes = n_vis + L * n + n + n_logits
    A = torch.zeros(n_nodes, n_nodes, dtype=torch.float32)
    tgt_rows = list(range(n_vis)) + list(range(n_nodes - n_logits, n_nodes))
    A[tgt_rows, : n_vis + L * n + n] = R_all[:, src_cols]
    return A


def _node_infos(model, view: DictionaryView, st: _PromptState, src: _Sources, visited: list[int],
                logit_toks: list[int], logit_probs: Tensor, str_tokens: list[str], *,
                labels: Mapping[tuple[int, int], str] | None, roles: Sequence[str] | None,
                auto_labels: bool) -> list[NodeInfo]:
    """Phase 5: the nodes in adjacency order (visited features, error nodes, embeddings, logits), labelled."""
    L, n = src.n_layers, src.n
    roles = list(roles) if roles is not None else None

    def role(p):
        return roles[p] if roles is not None and p < len(roles) else None

    nodes: list[NodeInfo] = []
    promoted = _promoted_tokens(model, view, [(src.layer[j], src.feat[j]) for j in visited
                                                     if (src.layer[j], src.feat[j]) not in (labels or {})]) \
        if auto_labels else {}
    for j in visited:
        l, p, f = src.layer[j], src.pos[j], src.feat[j]
        lab = (labels or {}).get((l, f), "")
        if not lab:
            lab = f"L{l} F{f} @{str_tokens[p]!r}" + (f" → {promoted[(l, f)]}" if (l, f) in promoted else "")
        nodes.append(NodeInfo(node=Node("feature", l, p, f), label=lab, activation=float(src.act[j]), role=role(p),
                              token=str_tokens[p]))
    for l in range(L):
        for p in range(n):
            nodes.append(NodeInfo(node=Node("error", l, p), label=f"L{l} error @ {str_tokens[p]!r}",
                                  activation=float(src.errors[l, p].norm()), role=role(p), token=str_tokens[p]))
    for p in range(n):
        nodes.append(NodeInfo(node=Node("embed", -1, p), label=str_tokens[p], role=role(p), token=str_tokens[p],
                              token_id=int(st.tokens[0, p])))
    for t, pr in zip(logit_toks, logit_probs.tolist()):
        tok = model.tokenizer.decode([t])
        nodes.append(NodeInfo(node=Node("logit", L, n - 1, t), label=f"Output {tok!r} (p={pr:.3f})",
                              activation=float(st.logits_last[t]), token=tok, token_id=t,
                              role=role(n - 1)))
    return nodes


def _target_inputs(rc: _RowComputer, visited: list[int], logit_toks: list[int], n_nodes: int,
                   x_in: Mapping[int, Tensor], h_last: Tensor) -> Tensor:
    """[n_nodes] float64: the input of every target node -- visited features (pre-activation minus ``b_enc``) and
    logits -- from the transcoder inputs ``x_in[l]`` [n, d_in] and the final-normed last residual ``h_last`` [d];
    0 for the sources."""
    src = rc.src
    out = torch.zeros(n_nodes, dtype=torch.float64)
    for i, j in enumerate(visited):
        l = src.layer[j]
        out[i] = float(_feature_input(x_in[l][src.pos[j]], rc.view, l, src.feat[j]))
    for i, t in enumerate(logit_toks, start=n_nodes - len(logit_toks)):
        out[i] = float(_logit_input(h_last, rc.W_U, rc.u_mean, t))
    return out


def _biases(model, rc: _RowComputer, replay: FrozenReplay, visited: list[int], logit_toks: list[int],
            n_nodes: int) -> Tensor:
    """Phase 5: each target's input with every source at zero -- embeddings 0, MLP outputs ``b_dec`` (layers the
    dictionaries write to) or 0, skip terms of whatever reaches their transcoder inputs -- through the frozen
    replacement model."""
    L, n, d = model.cfg.n_layers, rc.st.n, model.cfg.d_model
    outs = set(rc.view.out_layers)
    with torch.no_grad():
        zero_mlp = {l: (rc.view.b_dec[l].expand(1, n, d) if l in outs else torch.zeros(1, n, d)) for l in range(L)}
        x0, f0 = replacement_inputs(model, rc.st.tokens, replay, torch.zeros(1, n, d), zero_mlp, rc.view)
    return _target_inputs(rc, visited, logit_toks, n_nodes, {l: x[0] for l, x in x0.items()}, f0[0, -1])


def feature_graph(model, transcoders: Any, prompt: str | Sequence[int] | Tensor, *,
                  extra_logits: Sequence[int] = (), max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                  max_feature_nodes: int = 512, batch_size: int = 32, include_bos: bool = False,
                  labels: Mapping[tuple[int, int], str] | None = None, roles: Sequence[str] | None = None,
                  auto_labels: bool = True, progress: bool = False) -> FeatureGraphResult:
    """The attribution graph of ``prompt`` over transcoder features (see the module docstring).

    Args:
        transcoders: a :class:`TranscoderSet` (per-layer transcoders, with or without skip connections, or a
            cross-layer transcoder; input hook one of :data:`IN_HOOKS`), a :class:`CrossLayerTranscoder`, a
            :class:`DictionaryView`, or ``{layer: transcoder}`` (per-layer, default hooks; any subset of layers).
        prompt: text (BOS prepended) or token ids.
        extra_logits: token ids always given a logit node (e.g. the answer and the counterfactual answer).
        max_n_logits / desired_logit_prob: logit nodes are the most likely next tokens until their
            probability reaches ``desired_logit_prob``, at most ``max_n_logits`` (circuit-tracer's defaults).
        max_feature_nodes: cap on feature nodes, visited in order of estimated influence.
        batch_size: targets per backward pass.
        labels: ``{(layer, feature): label}`` used as node labels (e.g. from ``sae.label_features``).
        auto_labels: label the other features ``L{l} F{f} @'token' → 'a'/'b'`` with the token where the feature
            is active and the two tokens its decoder direction promotes most through the unembedding.
        roles: per-position role names stored on the nodes (for relation-level combination).
    """
    view = _checked_transcoders(model, transcoders, max_feature_nodes, batch_size)
    tokens, text = _prompt_tokens(model, prompt)
    L = model.cfg.n_layers

    # Phase 0: the ordinary forward pass (the prompt's state) and the recording of norm scales and attention
    replay = FrozenReplay(model)
    st = _prompt_state(model, tokens, view, replay)
    # Phase 1: candidate sources -- active features, error nodes, embeddings
    src = _active_sources(st, view, L, include_bos)
    # Phase 2: logit targets, and the kept forward pass of the frozen replacement model that gives every row
    logit_toks, logit_probs = _logit_targets(model, st, max_n_logits, desired_logit_prob, extra_logits)
    rc = _RowComputer(model, st, src, view, replay)
    # Phase 3: logit rows, then feature rows in order of estimated influence
    logit_rows, visited, feat_rows = _visit_features(rc, logit_toks, logit_probs, max_feature_nodes, batch_size,
                                                     progress)
    # Phase 4: unvisited features folded into the error nodes; the adjacency matrix
    A = _assemble(src, view, logit_rows, visited, feat_rows, rc.grads)
    rc.grads.clear()
    # Phase 5: nodes, their actual inputs and their biases
    n_nodes = A.shape[0]
    str_tokens = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    nodes = _node_infos(model, view, st, src, visited, logit_toks, logit_probs, str_tokens, labels=labels,
                        roles=roles, auto_labels=auto_labels)
    node_input = _target_inputs(rc, visited, logit_toks, n_nodes, st.x_in, st.normed_last)
    bias = _biases(model, rc, replay, visited, logit_toks, n_nodes)

    graph = AttributionGraph(
        nodes=nodes, adjacency=A.double(), logit_indices=list(range(n_nodes - len(logit_toks), n_nodes)),
        logit_probabilities=logit_probs.double(), prompt=text, prompt_tokens=str_tokens,
        prompt_token_ids=tokens[0].tolist(), n_layers=L,
        metadata={"kind": "feature", "model": model.cfg.model_name, "transcoder_layers": list(view.layers),
                  "dictionary_kind": view.kind, "activation": view.activation, "hook_in": view.hook_in,
                  "hook_out": view.hook_out, "n_active_features": src.n_feat,
                  "max_feature_nodes": max_feature_nodes, "include_bos": include_bos})
    return FeatureGraphResult(graph=graph, bias=bias, node_input=node_input, n_active_features=src.n_feat,
                              n_visited=len(visited), logit_tokens=logit_toks, errors=src.errors)


#: ``{dictionary module: {(layer, feature, top_n): "'a'/'b'"}}``: features recur across the prompts of a relation.
_PROMOTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _promoted_tokens(model, view: DictionaryView, feats: Sequence[tuple[int, int]], top_n: int = 2,
                     chunk: int = 64) -> dict[tuple[int, int], str]:
    """``{(layer, feature): "'a'/'b'"}``: the tokens each feature's residual write (:meth:`DictionaryView.direction`)
    promotes most (final norm, unembedding, demeaned over the vocabulary); cached per dictionary module in
    :data:`_PROMOTED`."""
    out: dict[tuple[int, int], str] = {}
    todo = []
    for l, f in dict.fromkeys(feats):
        hit = _PROMOTED.get(view.module(l), {}).get((l, f, top_n))
        if hit is None:
            todo.append((l, f))
        else:
            out[(l, f)] = hit
    for s in range(0, len(todo), chunk):
        part = todo[s: s + chunk]
        # directions of several layers stacked: one unembedding call per chunk
        _, top, _, _ = direction_logit_effects(model, torch.stack([view.direction(l, f) for l, f in part]), top_n)
        for (l, f), ids in zip(part, top.tolist()):
            out[(l, f)] = "/".join(repr(model.tokenizer.decode([t])) for t in ids)
            _PROMOTED.setdefault(view.module(l), {})[(l, f, top_n)] = out[(l, f)]
    return out


def _column_influence(logit_rows: Tensor, w_logit: Tensor, feat_rows: Tensor | None, visited: list[int]) -> Tensor:
    """Estimated influence of every source column on the logits through the rows computed so far.

    Rows are normalised by their absolute sums (circuit-tracer); the influence of visited features solves
    ``x = w A_lv + x A_vv`` (a DAG, so the series terminates), then every column gets ``w A_l + x A_v``.
    """
    def norm(R):
        R = R.abs().double()
        return R / R.sum(1, keepdim=True).clamp_min(1e-12)

    Al = norm(logit_rows)
    infl = w_logit @ Al
    if feat_rows is None or not visited:
        return infl
    Av = norm(feat_rows)
    vis = torch.tensor(visited)
    x = w_logit @ Al[:, vis]
    total_x = x.clone()
    for _ in range(len(visited) + 1):
        x = x @ Av[:, vis]
        if float(x.abs().sum()) < 1e-12:
            break
        total_x += x
    return infl + total_x @ Av


# ------------------------------------------------------------------------------------- graph scores
def graph_scores(graph: AttributionGraph) -> dict[str, float | None]:
    """circuit-tracer's replacement and completeness scores of an attribution graph, and the error nodes' share
    of the influence on the logits.

    With ``A`` the row-normalised absolute adjacency (targets as rows) and ``I`` each node's influence on the
    probability-weighted logits through all paths (``sum_k w A^k``, as used for pruning):

    * ``replacement_score`` = ``I(embeddings) / (I(embeddings) + I(errors))``: the share of the token-to-logit
      influence that does not end in an error node (1 when every path from the tokens runs through features);
    * ``completeness_score`` = ``sum_i (1 - sum_{e in errors} A[i, e]) (I_i + w_i) / sum_i (I_i + w_i)``: the
      influence-weighted share of each node's input that comes from features or tokens rather than errors;
    * ``error_influence_share`` = ``I(errors) / (I(features) + I(errors) + I(embeddings))``.

    The error nodes of :func:`feature_graph` also hold the unvisited (capped) and BOS features, so a cap lowers
    both scores: they measure how much of the computation the graph's own feature nodes explain. ``None`` where
    a denominator is 0.
    """
    from circuit_discovery.graph.influence import compute_influence, normalize_matrix

    a = normalize_matrix(graph.adjacency)
    w = graph.logit_weights()
    infl = compute_influence(a, w)
    comp = [nd.node.component for nd in graph.nodes]
    err = torch.tensor([c == "error" for c in comp], dtype=torch.bool)
    tok = torch.tensor([c == "embed" for c in comp], dtype=torch.bool)
    feat = torch.tensor([c == "feature" for c in comp], dtype=torch.bool)
    i_err, i_tok, i_feat = float(infl[err].sum()), float(infl[tok].sum()), float(infl[feat].sum())
    out_infl = infl + w
    total_out = float(out_infl.sum())
    non_err = 1.0 - a[:, err].sum(1)
    return {
        "replacement_score": i_tok / (i_tok + i_err) if i_tok + i_err > 0 else None,
        "completeness_score": float((non_err * out_infl).sum()) / total_out if total_out > 0 else None,
        "error_influence_share": i_err / (i_err + i_tok + i_feat) if i_err + i_tok + i_feat > 0 else None,
    }


# ------------------------------------------------------------------------------------- relation circuits
@dataclass
class FeatureCircuitResult:
    """A relation's feature circuit: the pruned :class:`Circuit`, the role-keyed combined graph and the per-prompt
    feature graphs (with their exactness data)."""

    circuit: Any
    combined: AttributionGraph
    graphs: list[FeatureGraphResult]
    info: dict[str, Any]


def feature_circuit(model, transcoders: Any, pairs: Sequence, *, name: str | None = None,
                    max_feature_nodes: int = 256, batch_size: int = 32, max_n_logits: int = 10,
                    desired_logit_prob: float = 0.95, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                    labels: Mapping[tuple[int, int], str] | None = None, progress: bool = False,
                    **prune_kwargs: Any) -> FeatureCircuitResult:
    """One feature graph per fact pair (prompt = the clean prompt; the answer and the counterfactual answer always
    get logit nodes), combined by token role (:func:`combine_graphs`: nodes keyed by layer, role and feature) and
    pruned by influence into a :class:`Circuit`."""
    import time

    from circuit_discovery.attribution.inputs import check_pairs
    from circuit_discovery.graph.circuit import combine_graphs

    check_pairs(pairs)
    t0 = time.perf_counter()
    transcoders = dictionary_view(model, transcoders)  # read and checked once for every prompt
    results = []
    it = pairs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(pairs, desc=f"feature graphs {name or pairs[0].relation}", unit="prompt", dynamic_ncols=True)
    for p in it:
        extra = [int(p.answer_tokens[0])] + ([int(p.counterfactual_tokens[0])] if p.counterfactual_tokens else [])
        res = feature_graph(model, transcoders, list(p.clean_tokens), extra_logits=extra, max_n_logits=max_n_logits,
                            desired_logit_prob=desired_logit_prob, max_feature_nodes=max_feature_nodes,
                            batch_size=batch_size, labels=labels, roles=list(p.roles))
        res.graph.prompt = p.clean_prompt
        res.graph.metadata.update({"answer": p.answer, "counterfactual_answer": p.counterfactual_answer,
                                   "roles": list(p.roles)})
        results.append(res)
    relation = pairs[0].relation
    facts = [{"prompt": p.clean_prompt, "answer": p.answer} for p in pairs]
    graphs = [_answer_only(r.graph, int(p.answer_tokens[0])) for r, p in zip(results, pairs)]
    circuit, combined = combine_graphs(graphs, [list(p.roles) for p in pairs], name=name or relation,
                                       relation=relation, facts=facts, node_threshold=node_threshold,
                                       edge_threshold=edge_threshold, **prune_kwargs)
    circuit.extra.setdefault("method", "transcoder feature graph")
    circuit.extra.setdefault("granularity", "feature")
    info = {"nodes_before": combined.n_nodes, "edges_before": int((combined.adjacency != 0).sum()),
            "nodes_after": len(circuit.nodes), "edges_after": len(circuit.edges),
            "active_features_per_prompt": [r.n_active_features for r in results],
            "visited_features_per_prompt": [r.n_visited for r in results],
            "graph_scores": [r.scores() for r in results],
            "seconds": time.perf_counter() - t0}
    return FeatureCircuitResult(circuit, combined, results, info)


def _answer_only(graph: AttributionGraph, answer: int) -> AttributionGraph:
    """The graph with its answer's logit node as the only output (the relation circuit explains the answer)."""
    keep = torch.ones(graph.n_nodes, dtype=torch.bool)
    ans = None
    for i in graph.logit_indices:
        if graph.nodes[i].node.index == answer:
            ans = i
        else:
            keep[i] = False
    if ans is None:
        raise InputError(f"the graph has no logit node for the answer token {answer}")
    g = AttributionGraph(nodes=graph.nodes, adjacency=graph.adjacency, logit_indices=[ans],
                         logit_probabilities=torch.ones(1, dtype=torch.float64), prompt=graph.prompt,
                         prompt_tokens=graph.prompt_tokens, prompt_token_ids=graph.prompt_token_ids,
                         n_layers=graph.n_layers, metadata=dict(graph.metadata))
    return g.subgraph(keep)


def decoder_directions(graph: AttributionGraph, transcoders: Any, model=None) -> dict[str, list[float]]:
    """``{node_id: direction}`` of the graph's feature nodes (for :func:`find_supernodes`): ``W_dec[feature]`` for
    per-layer transcoders, the decoder rows summed over the target layers for a cross-layer transcoder
    (:meth:`DictionaryView.direction`; pass ``model`` unless ``transcoders`` is a :class:`DictionaryView`)."""
    if isinstance(transcoders, DictionaryView):
        view = transcoders
    elif model is not None:
        view = DictionaryView(model, transcoders)
    else:
        ts = as_transcoder_set(transcoders)
        if ts.cross_layer is not None:
            raise InputError("decoder_directions of a cross-layer transcoder needs model= (or a DictionaryView)")
        return {nd.id: ts.per_layer[nd.node.layer].W_dec[nd.node.index].detach().float().tolist()
                for nd in graph.nodes if nd.node.component == "feature" and nd.node.layer in ts.per_layer}
    return {nd.id: view.direction(nd.node.layer, int(nd.node.index or 0)).tolist()
            for nd in graph.nodes if nd.node.component == "feature" and nd.node.layer in view.layers}
