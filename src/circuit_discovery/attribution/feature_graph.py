"""Feature attribution graphs over transcoder features (the circuit-tracer approach).

For one prompt, the *local replacement model* is the model with

* every MLP replaced by its layer's transcoder (which reads ``blocks.{l}.mlp.hook_in`` and predicts
  ``blocks.{l}.hook_mlp_out``) plus an **error node** per (layer, position) holding what the transcoder
  misses -- a layer without a transcoder keeps its whole MLP output as the error node;
* every normalisation scale (RMSNorm / LayerNorm, incl. the final norm and Gemma's post-norms) and every
  attention pattern (queries and keys) **frozen** at their values on the prompt.

Given the prompt, that model is affine in its sources -- token embeddings, feature activations, error
vectors -- up to each feature's pre-activation and each logit. An edge ``source -> target`` is the
source's direct effect on the target's input::

    A[target, source] = a_source * (W_dec[source] . d input_target / d mlp_out(l, p))   (feature source)
                      = e(l, p) . d input_target / d mlp_out(l, p)                      (error source)
                      = emb(p) . d input_target / d hook_embed(p)                      (embedding source)

where ``input_target`` is ``x_l(p) . W_enc[:, f]`` for a feature ``f`` at layer ``l``, position ``p``
(its pre-activation minus ``b_enc``) and ``h_last . (W_U[t] - mean W_U)`` for a logit (before any soft
cap). Because the replacement is affine, ``input(target) = sum_s A[target, s] + bias(target)``, where
``bias`` is the target's input with every source set to zero (transcoder ``b_dec``, norm biases). Edges are
computed in batched backward passes: one batch item per target, the prompt repeated, the frozen values
replayed.

Only the ``max_feature_nodes`` most influential active features become nodes: rows are computed first for
the logit nodes, then for features in order of their estimated influence on the logits (through the rows
computed so far), a batch at a time. The contribution of active features that are not visited is added
to their (layer, position) error node, so the graph stays exact -- every node's input is still the sum of
its incoming edges plus its bias. BOS features are folded into the error nodes the same way
(``include_bos=False``, default: the BOS residual is an outlier that transcoders are not trained on). An error
node is therefore *everything the MLP writes at (layer, position) except ``b_dec`` and the visited features'
decoder contributions* (``FeatureGraphResult.errors``); the circuit evaluator
(:class:`~circuit_discovery.validation.features.FeatureCircuitEvaluator.from_graphs`) uses the same definition.
:func:`graph_scores` gives circuit-tracer's replacement and completeness scores of a graph.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from circuit_discovery.errors import InputError
from circuit_discovery.graph.graph import AttributionGraph, NodeInfo
from circuit_discovery.models.arch import get_module
from circuit_discovery.models.hooked import frozen
from circuit_discovery.nodes import Node
from circuit_discovery.sae.labels import direction_logit_effects

__all__ = ["FrozenReplay", "FeatureGraphResult", "FeatureCircuitResult", "decoder_directions", "feature_circuit",
           "feature_graph", "graph_scores", "replacement_inputs"]


# ------------------------------------------------------------------------------------- freezing
def _norm_modules(model) -> list[nn.Module]:
    """Every RMSNorm/LayerNorm of the model except the MLP-output post-norm (its output is replaced)."""
    skip = set()
    if model.spec.mlp_out != "mlp":
        for layer in model._layers:
            skip.add(id(get_module(layer, model.spec.mlp_out)))
    out = []
    for m in model.hf_model.modules():
        name = type(m).__name__
        if (isinstance(m, nn.LayerNorm) or name.endswith("RMSNorm")) and id(m) not in skip:
            out.append(m)
    return out


def _eps(m: nn.Module) -> float:
    return float(getattr(m, "eps", getattr(m, "variance_epsilon", 1e-6)))


class FrozenReplay:
    """Record norm scales and attention queries/keys in one forward pass, then replay them.

    Inside ``with replay.recording():`` a forward pass (batch 1) stores, for each norm module, the scale
    ``1 / rms(x)`` (or ``1 / std(x)`` for LayerNorm), and each layer's query and key projections. Inside
    ``with replay.replaying(batch):`` every later pass uses those stored values (expanded to ``batch``), so
    norms are linear maps and attention patterns are constants: the network is affine in the residual
    stream, and its gradients are the replacement model's direct effects.
    """

    def __init__(self, model):
        self.model = model
        self.norms = _norm_modules(model)
        self.gamma: dict[int, Tensor] = {}
        for m in self.norms:
            if isinstance(m, nn.LayerNorm):
                continue
            eps = _eps(m)
            with torch.no_grad():
                ones = torch.ones(m.weight.shape[-1] if getattr(m, "weight", None) is not None else model.cfg.d_model,
                                  dtype=torch.float32, device=model.device)
                self.gamma[id(m)] = (m(ones).float() * math.sqrt(1.0 + eps)).detach()
        self.scales: dict[int, Tensor] = {}
        self.qk: dict[tuple[int, str], Tensor] = {}
        self._mode: str | None = None
        self._batch = 1

    # -- norm hooks
    def _norm_hook(self, module, args, output):
        x = args[0]
        key = id(module)
        xf = x.float()
        if isinstance(module, nn.LayerNorm):
            xc = xf - xf.mean(-1, keepdim=True)
            if self._mode == "record":
                self.scales[key] = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + module.eps).detach()
            s = self.scales[key]
            s = s.expand(x.shape[0], *s.shape[1:]) if s.shape[0] != x.shape[0] else s
            y = xc * s
            if module.weight is not None:
                y = y * module.weight.float()
            if module.bias is not None:
                y = y + module.bias.float()
            return y.to(output.dtype)
        if self._mode == "record":
            self.scales[key] = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(module)).detach()
        s = self.scales[key]
        s = s.expand(x.shape[0], *s.shape[1:]) if s.shape[0] != x.shape[0] else s
        return (xf * s * self.gamma[key]).to(output.dtype)

    def _qk_hook(self, key, sl, module, args, output):
        if self._mode == "record":
            self.qk[key] = output.detach()[..., sl] if sl is not None else output.detach()
        stored = self.qk[key]
        stored = stored.expand(output.shape[0], *stored.shape[1:]) if stored.shape[0] != output.shape[0] else stored
        if sl is None:
            return stored
        out = output.clone()
        out[..., sl] = stored
        return out

    def _qk_modules(self):
        """(key, module, slice) for every query/key projection."""
        out = []
        d = self.model.cfg.d_model
        for l, layer in enumerate(self.model._layers):
            attn = get_module(layer, self.model.spec.attn)
            if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
                out.append(((l, "q"), attn.q_proj, None))
                out.append(((l, "k"), attn.k_proj, None))
            elif hasattr(attn, "c_attn"):  # GPT-2: one projection [q | k | v]
                out.append(((l, "qk"), attn.c_attn, slice(0, 2 * d)))
            else:
                raise InputError(f"feature graphs do not know how to freeze attention of {type(attn).__name__}")
        return out

    @contextlib.contextmanager
    def _hooks(self, mode: str):
        self._mode = mode
        handles = [m.register_forward_hook(self._norm_hook, prepend=True) for m in self.norms]
        for key, mod, sl in self._qk_modules():
            handles.append(mod.register_forward_hook(
                lambda module, args, output, key=key, sl=sl: self._qk_hook(key, sl, module, args, output),
                prepend=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._mode = None

    def recording(self):
        self.scales.clear()
        self.qk.clear()
        return self._hooks("record")

    def replaying(self):
        if not self.scales:
            raise RuntimeError("FrozenReplay.replaying() needs a recording() pass first")
        return self._hooks("replay")


# ------------------------------------------------------------------------------------- the prompt's state
@dataclass
class _PromptState:
    tokens: Tensor  # [1, n]
    n: int
    emb: Tensor  # [n, d]
    mlp_out: dict[int, Tensor]  # layer -> [n, d] (true MLP output)
    x_in: dict[int, Tensor]  # transcoder layer -> [n, d_in] transcoder input
    acts: dict[int, Tensor]  # transcoder layer -> [n, d_sae] activations
    normed_last: Tensor  # [d] final-normed residual at the last position
    logits_last: Tensor  # [vocab] real logits at the last position


def _prompt_state(model, tokens: Tensor, transcoders: Mapping[int, Any], replay: FrozenReplay) -> _PromptState:
    L = model.cfg.n_layers
    names = ["hook_embed"] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
    names += [f"blocks.{l}.mlp.hook_in" for l in transcoders]
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
    for l, tc in transcoders.items():
        x = cache[f"blocks.{l}.mlp.hook_in"][0]
        x_in[l] = x
        with torch.no_grad():
            acts[l] = tc.encode(x.to(tc.W_enc.dtype)).float()
    return _PromptState(tokens=tokens, n=tokens.shape[1], emb=cache["hook_embed"][0].float(),
                        mlp_out={l: cache[f"blocks.{l}.hook_mlp_out"][0].float() for l in range(L)},
                        x_in=x_in, acts=acts, normed_last=h[0, -1].float(), logits_last=logits.float())


def replacement_inputs(model, tokens: Tensor, replay: FrozenReplay, emb: Tensor, mlp_out: Mapping[int, Tensor],
                       transcoders: Mapping[int, Any], requires_grad: bool = False):
    """One pass of the frozen replacement model over ``tokens`` [B, n] with the given sources.

    ``emb`` [B, n, d] replaces ``hook_embed`` and ``mlp_out[l]`` [B, n, d] replaces ``blocks.{l}.hook_mlp_out``
    for every layer. Returns ``(x_in, final)``: ``x_in[l]`` [B, n, d_in] the transcoder inputs (so a
    feature's input is ``x_in[l][:, p] @ W_enc[:, f]``) and ``final`` [B, n, d] the final-normed residual.
    Norm scales and attention queries/keys are replayed from ``replay``'s recording.
    """
    store: dict[int, Tensor] = {}

    def put(value):
        return lambda act, name: value.to(act.dtype)

    def keep(layer):
        def fn(act, name):
            store[layer] = act
        return fn

    hooks = [("hook_embed", put(emb))]
    hooks += [(f"blocks.{l}.hook_mlp_out", put(v)) for l, v in mlp_out.items()]
    hooks += [(f"blocks.{l}.mlp.hook_in", keep(l)) for l in transcoders]
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


def _checked_transcoders(model, transcoders: Mapping[int, Any], max_feature_nodes: int,
                         batch_size: int) -> dict[int, Any]:
    """``transcoders`` keyed by int layer in layer order, after checking layers, kinds and the search limits."""
    if not transcoders:
        raise InputError("feature graphs need at least one transcoder; train them with "
                         "circuit_discovery.sae.train_transcoders(model)")
    L = model.cfg.n_layers
    for l, tc in transcoders.items():
        if not 0 <= int(l) < L:
            raise InputError(f"transcoder layer {l} out of range for a {L}-layer model")
        if not getattr(tc.cfg, "transcoder", False):
            raise InputError(f"the dictionary at layer {l} is an SAE, not a transcoder; feature graphs need "
                             "transcoders (mlp.hook_in -> hook_mlp_out)")
    if max_feature_nodes < 0 or batch_size <= 0:
        raise InputError("max_feature_nodes must be >= 0 and batch_size > 0")
    return {int(l): tc for l, tc in sorted(transcoders.items())}


def _prompt_tokens(model, prompt: str | Sequence[int] | Tensor) -> tuple[Tensor, str]:
    """``prompt`` as token ids [1, n] on the model's device (BOS prepended to text), and its text."""
    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)
        text = prompt
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        text = model.tokenizer.decode(tokens[0].tolist())
    return tokens.to(model.device), text


def _feature_input(x: Tensor, tc, f: int) -> Tensor:
    """Feature ``f``'s input (pre-activation minus ``b_enc``) from its transcoder input ``x`` [d_in]."""
    return x.float() @ tc.W_enc[:, f].detach().float()


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


def _active_sources(st: _PromptState, transcoders: Mapping[int, Any], n_layers: int, include_bos: bool) -> _Sources:
    """Phase 1: the active features of every transcoder layer (BOS excluded unless ``include_bos``) and the error
    vectors."""
    feat_l, feat_p, feat_f, feat_a = [], [], [], []
    first = 0 if include_bos else 1
    for l, a in st.acts.items():
        pp, ff = (a[first:] != 0).nonzero(as_tuple=True)
        feat_l += [l] * len(pp)
        feat_p += (pp + first).tolist()
        feat_f += ff.tolist()
        feat_a += a[pp + first, ff].tolist()
    recon = {l: st.acts[l] @ tc.W_dec.detach().float() + tc.b_dec.detach().float()  # all active features + b_dec
             for l, tc in transcoders.items()}
    errors = torch.stack([st.mlp_out[l] - recon[l] if l in transcoders else st.mlp_out[l]
                          for l in range(n_layers)])  # [L, n, d] true reconstruction errors
    if not include_bos:  # BOS features are folded into the BOS error node
        for l, tc in transcoders.items():
            errors[l, 0] = st.mlp_out[l][0] - tc.b_dec.detach().float()
    return _Sources(feat_l, feat_p, feat_f, feat_a, errors, n_layers, st.n)


class _RowComputer:
    """Rows of the adjacency matrix (direct effects of every source on a target) from one kept forward pass.

    One forward pass of the frozen replacement model (batch 1) with zero-valued leaves at the sources; its
    graph is kept, and each batch of targets is one vmapped backward (``is_grads_batched``) through it. The
    network is affine in the sources under the replay, so every target's row comes from the same forward
    (3-4x faster than a forward of B copies of the prompt per batch).
    """

    def __init__(self, model, st: _PromptState, src: _Sources, transcoders: Mapping[int, Any], replay: FrozenReplay):
        L, n, d = model.cfg.n_layers, st.n, model.cfg.d_model
        self.st, self.src, self.transcoders, self.d = st, src, transcoders, d
        self.W_U = model.W_U.detach().float()
        self.u_mean = self.W_U.mean(0)
        d_e = torch.zeros(1, n, d, requires_grad=True)
        d_m = {l: torch.zeros(1, n, d, requires_grad=True) for l in range(L)}
        self.x_in, self.final = replacement_inputs(model, st.tokens, replay, st.emb[None] + d_e,
                                                   {l: st.mlp_out[l][None] + d_m[l] for l in range(L)},
                                                   transcoders, requires_grad=True)
        self.leaves = [d_e] + [d_m[l] for l in range(L)]
        self.sel_of = {l: (src.layer_t == l).nonzero().flatten() for l in transcoders}  # active-feature columns
        self.dec_rows = {l: tc.W_dec.detach().float()[src.feat_t[self.sel_of[l]]]  # [S, d] their decoder rows
                         for l, tc in transcoders.items()}

    def _target_input(self, kind: str, j: int) -> Tensor:
        if kind == "logit":
            return _logit_input(self.final[0, -1], self.W_U, self.u_mean, j)
        l, p, f = self.src.layer[j], self.src.pos[j], self.src.feat[j]
        return _feature_input(self.x_in[l][0, p], self.transcoders[l], f)

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
        for l in self.transcoders:
            sel = self.sel_of[l]
            if len(sel) == 0:
                continue
            # gradient . decoder row of the active features only ([B, n, S]), read at each one's position
            proj = g_m[l] @ self.dec_rows[l].T
            rows[:, sel] = proj[:, src.pos_t[sel], torch.arange(len(sel))] * src.act_t[sel][None]
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


def _assemble(src: _Sources, transcoders: Mapping[int, Any], logit_rows: Tensor, visited: list[int],
              feat_rows: list[Tensor]) -> Tensor:
    """Phase 4: the adjacency [n_nodes, n_nodes] (rows are targets) in node order: visited features, error nodes,
    embeddings, logits.

    Each unvisited feature is folded into its (layer, position) error node -- its column is added to the error
    node's column and its decoder contribution to the error vector (``src.errors``, updated in place) -- which
    keeps the graph exact."""
    L, n = src.n_layers, src.n
    is_visited = torch.zeros(src.n_feat, dtype=torch.bool)
    is_visited[visited] = True
    R_all = torch.cat(feat_rows + [logit_rows], 0)  # targets: visited features, then logits
    rest = (~is_visited).nonzero().flatten()
    if len(rest):
        err_cols = src.err_off + src.layer_t[rest] * n + src.pos_t[rest]
        R_all.index_add_(1, err_cols, R_all[:, rest])
        # the error node's vector: reconstruction error + the decoder contributions of the folded features
        for l, tc in transcoders.items():
            sel = rest[src.layer_t[rest] == l]
            if len(sel):
                contrib = src.act_t[sel][:, None] * tc.W_dec.detach().float()[src.feat_t[sel]]
                src.errors[l].index_add_(0, src.pos_t[sel], contrib)
    n_vis, n_logits = len(visited), logit_rows.shape[0]
    vis = torch.tensor(visited, dtype=torch.long)
    src_cols = torch.cat([vis, torch.arange(src.err_off, src.n_cols)])  # visited features, errors, embeddings
    n_nodes = n_vis + L * n + n + n_logits
    A = torch.zeros(n_nodes, n_nodes, dtype=torch.float32)
    tgt_rows = list(range(n_vis)) + list(range(n_nodes - n_logits, n_nodes))
    A[tgt_rows, : n_vis + L * n + n] = R_all[:, src_cols]
    return A


def _node_infos(model, transcoders: Mapping[int, Any], st: _PromptState, src: _Sources, visited: list[int],
                logit_toks: list[int], logit_probs: Tensor, str_tokens: list[str], *,
                labels: Mapping[tuple[int, int], str] | None, roles: Sequence[str] | None,
                auto_labels: bool) -> list[NodeInfo]:
    """Phase 5: the nodes in adjacency order (visited features, error nodes, embeddings, logits), labelled."""
    L, n = src.n_layers, src.n
    roles = list(roles) if roles is not None else None

    def role(p):
        return roles[p] if roles is not None and p < len(roles) else None

    nodes: list[NodeInfo] = []
    promoted = _promoted_tokens(model, transcoders, [(src.layer[j], src.feat[j]) for j in visited
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
        out[i] = float(_feature_input(x_in[l][src.pos[j]], rc.transcoders[l], src.feat[j]))
    for i, t in enumerate(logit_toks, start=n_nodes - len(logit_toks)):
        out[i] = float(_logit_input(h_last, rc.W_U, rc.u_mean, t))
    return out


def _biases(model, rc: _RowComputer, replay: FrozenReplay, visited: list[int], logit_toks: list[int],
            n_nodes: int) -> Tensor:
    """Phase 5: each target's input with every source at zero -- embeddings 0, MLP outputs ``b_dec``
    (transcoder layers) or 0 -- through the frozen replacement model."""
    L, n, d = model.cfg.n_layers, rc.st.n, model.cfg.d_model
    with torch.no_grad():
        zero_mlp = {l: (rc.transcoders[l].b_dec.detach().float().expand(1, n, d) if l in rc.transcoders
                        else torch.zeros(1, n, d)) for l in range(L)}
        x0, f0 = replacement_inputs(model, rc.st.tokens, replay, torch.zeros(1, n, d), zero_mlp, rc.transcoders)
    return _target_inputs(rc, visited, logit_toks, n_nodes, {l: x[0] for l, x in x0.items()}, f0[0, -1])


def feature_graph(model, transcoders: Mapping[int, Any], prompt: str | Sequence[int] | Tensor, *,
                  extra_logits: Sequence[int] = (), max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                  max_feature_nodes: int = 512, batch_size: int = 32, include_bos: bool = False,
                  labels: Mapping[tuple[int, int], str] | None = None, roles: Sequence[str] | None = None,
                  auto_labels: bool = True, progress: bool = False) -> FeatureGraphResult:
    """The attribution graph of ``prompt`` over transcoder features (see the module docstring).

    Args:
        transcoders: ``{layer: SparseAutoencoder}`` with ``cfg.transcoder`` (any subset of layers).
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
    transcoders = _checked_transcoders(model, transcoders, max_feature_nodes, batch_size)
    tokens, text = _prompt_tokens(model, prompt)
    L = model.cfg.n_layers

    # Phase 0: the ordinary forward pass (the prompt's state) and the recording of norm scales and attention
    replay = FrozenReplay(model)
    st = _prompt_state(model, tokens, transcoders, replay)
    # Phase 1: candidate sources -- active features, error nodes, embeddings
    src = _active_sources(st, transcoders, L, include_bos)
    # Phase 2: logit targets, and the kept forward pass of the frozen replacement model that gives every row
    logit_toks, logit_probs = _logit_targets(model, st, max_n_logits, desired_logit_prob, extra_logits)
    rc = _RowComputer(model, st, src, transcoders, replay)
    # Phase 3: logit rows, then feature rows in order of estimated influence
    logit_rows, visited, feat_rows = _visit_features(rc, logit_toks, logit_probs, max_feature_nodes, batch_size,
                                                     progress)
    # Phase 4: unvisited features folded into the error nodes; the adjacency matrix
    A = _assemble(src, transcoders, logit_rows, visited, feat_rows)
    # Phase 5: nodes, their actual inputs and their biases
    n_nodes = A.shape[0]
    str_tokens = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    nodes = _node_infos(model, transcoders, st, src, visited, logit_toks, logit_probs, str_tokens, labels=labels,
                        roles=roles, auto_labels=auto_labels)
    node_input = _target_inputs(rc, visited, logit_toks, n_nodes, st.x_in, st.normed_last)
    bias = _biases(model, rc, replay, visited, logit_toks, n_nodes)

    graph = AttributionGraph(
        nodes=nodes, adjacency=A.double(), logit_indices=list(range(n_nodes - len(logit_toks), n_nodes)),
        logit_probabilities=logit_probs.double(), prompt=text, prompt_tokens=str_tokens,
        prompt_token_ids=tokens[0].tolist(), n_layers=L,
        metadata={"kind": "feature", "model": model.cfg.model_name, "transcoder_layers": sorted(transcoders),
                  "n_active_features": src.n_feat, "max_feature_nodes": max_feature_nodes,
                  "include_bos": include_bos})
    return FeatureGraphResult(graph=graph, bias=bias, node_input=node_input, n_active_features=src.n_feat,
                              n_visited=len(visited), logit_tokens=logit_toks, errors=src.errors)


#: ``{transcoder: {(feature, top_n): "'a'/'b'"}}``: features recur across the prompts of a relation.
_PROMOTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _promoted_tokens(model, transcoders: Mapping[int, Any], feats: Sequence[tuple[int, int]], top_n: int = 2,
                     chunk: int = 64) -> dict[tuple[int, int], str]:
    """``{(layer, feature): "'a'/'b'"}``: the tokens each decoder direction promotes most (final norm, unembedding,
    demeaned over the vocabulary); cached per transcoder in :data:`_PROMOTED`."""
    out: dict[tuple[int, int], str] = {}
    todo = []
    for l, f in dict.fromkeys(feats):
        hit = _PROMOTED.get(transcoders[l], {}).get((f, top_n))
        if hit is None:
            todo.append((l, f))
        else:
            out[(l, f)] = hit
    for s in range(0, len(todo), chunk):
        part = todo[s: s + chunk]
        # directions of several layers stacked: one unembedding call per chunk
        _, top, _, _ = direction_logit_effects(model, torch.stack([transcoders[l].W_dec[f] for l, f in part]), top_n)
        for (l, f), ids in zip(part, top.tolist()):
            out[(l, f)] = "/".join(repr(model.tokenizer.decode([t])) for t in ids)
            _PROMOTED.setdefault(transcoders[l], {})[(f, top_n)] = out[(l, f)]
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


def feature_circuit(model, transcoders: Mapping[int, Any], pairs: Sequence, *, name: str | None = None,
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


def decoder_directions(graph: AttributionGraph, transcoders: Mapping[int, Any]) -> dict[str, list[float]]:
    """``{node_id: W_dec[feature]}`` of the graph's feature nodes (for :func:`find_supernodes`)."""
    return {nd.id: transcoders[nd.node.layer].W_dec[nd.node.index].detach().float().tolist()
            for nd in graph.nodes if nd.node.component == "feature" and nd.node.layer in transcoders}
