"""Model-side circuit evaluation: ``m(C)`` with every component outside the circuit ``C`` ablated.

A circuit is a set of component node ids:

* role-keyed (relation circuits, :func:`circuit_discovery.graph.role_key`): ``embed/L-1/subject_last``,
  ``head/L4/I2/last``, ``attn_out/L3/relation``, ``mlp_out/L3/subject_last`` — the node covers every position of
  a prompt with that role (none where the prompt lacks the role);
* positional (``Node.key``): ``head/L4/I2/P5``, ``mlp_out/L3/P4``, ``embed/L-1/P0``.

Logit nodes (``logit/...``) are the metric, not components, and are ignored. The universe ``N`` is every
embedding, attention head (``granularity="head"``, patched at ``attn.hook_z``) or attention layer
(``"layer"``, ``hook_attn_out``) and MLP (``hook_mlp_out``) at every role (or position). ``m(C)`` runs the
clean prompts with the output of every node **not** in ``C`` replaced by

* ``"corrupted"``: its value in the corrupted prompt's run (default; Wang et al. 2023, MIB 2025),
* ``"mean"``: its mean over a reference set (the clean prompts of ``reference`` pairs of the same length, per
  position; default: the evaluated pairs themselves),
* ``"zero"``: zero,

and returns the metric averaged over the prompts. Nodes in ``C`` compute normally from their (partly ablated)
inputs. Hence ``m(N)`` is the clean metric and ``m(∅)`` the fully ablated one (for ``"corrupted"``: the
corrupted run scored on the clean answers), so faithfulness ``f(N) = 1`` and ``f(∅) = 0`` for every ablation.

``metric_of(list of node sets) -> list of floats`` stacks the variants along the batch dimension (at most
``max_batch`` rows per forward pass) and plugs into :mod:`circuit_discovery.validation.curves` with
``batched=True``.

**Inert nodes and the relevant universe.** A node is *inert* when ablating it can never change anything: on
every evaluated prompt its hooked output equals (``torch.equal``, at every position it covers) the value it
would be ablated to, whatever else is ablated. :meth:`CircuitEvaluator.inert_nodes` finds them from one clean
run: an embedding node is inert when its clean and ablation values are equal at every covered position; any
other node when, in addition, every hooked value at every position up to and including the ones it covers is
equal (with causal attention its live value is then the clean one in every ablation context). Under subject
corruption these are BOS, every position before the first token that differs, and the embeddings of the
identical tokens. ``relevant_universe`` = universe minus inert nodes; node shares, curves (:meth:`curve`,
:meth:`faithfulness_at`) and matched baselines are taken over it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from circuit_discovery.attribution import PairInputs, check_pairs, noise_hook
from circuit_discovery.errors import InputError
from circuit_discovery.facts.types import ROLES
from circuit_discovery.metrics import MetricFn, PromptBatch, batch_from_pairs, get_metric
from circuit_discovery.models.hooked import HookedModel
from circuit_discovery.validation import curves
from circuit_discovery.validation.stats import Alternative

__all__ = ["ABLATIONS", "parse_component_id", "node_stratum", "CircuitEvaluator", "EvaluatorMethods"]

ABLATIONS = ("corrupted", "mean", "zero")
_COMPONENTS = ("embed", "head", "attn_out", "mlp_out")


def parse_component_id(node_id: str) -> tuple[str, int, int | None, str | None, int | None]:
    """``(component, layer, index, role, position)`` of a role-keyed or positional node id.

    Raises :class:`InputError` for malformed ids.
    """
    parts = str(node_id).split("/")
    if len(parts) < 2 or not parts[1].startswith("L"):
        raise InputError(f"bad node id {node_id!r}: expected e.g. 'mlp_out/L3/subject_last' or 'head/L4/I2/P5'")
    comp = parts[0]
    try:
        layer = int(parts[1][1:])
    except ValueError:
        raise InputError(f"bad layer in node id {node_id!r}") from None
    index = role = position = None
    for part in parts[2:]:
        if part in ROLES:
            role = part
        elif part[:1] == "I" and part[1:].lstrip("-").isdigit():
            index = int(part[1:])
        elif part[:1] == "P" and part[1:].isdigit():
            position = int(part[1:])
        else:
            raise InputError(f"bad part {part!r} in node id {node_id!r}; roles are {', '.join(ROLES)}")
    return comp, layer, index, role, position


def node_stratum(node_id: str) -> tuple[str, int, str | None]:
    """``(component, layer, role or "P<position>")`` of a node id: the stratum matched random circuits are
    drawn in (heads: component ``"head"``, the head index dropped; feature nodes: ``"feature"``, the feature
    index dropped)."""
    comp, layer, _index, role, position = parse_component_id(node_id)
    return comp, layer, role if role is not None else (f"P{position}" if position is not None else None)


def _place(node_id: str) -> str | None:
    return node_stratum(node_id)[2]


_STRATA = {
    "component_layer_role": node_stratum,
    "component_role": lambda n: (node_stratum(n)[0], node_stratum(n)[2]),
    "component_layer": lambda n: node_stratum(n)[:2],
}


class _Group:
    """Equal-length pairs with cached clean tokens and ablation values."""

    batch: PromptBatch
    values: dict[str, Tensor] | None  # hook name -> ablation value (None: zero ablation)

    def __init__(self, pairs, idx):
        self.pairs = [pairs[i] for i in idx]
        self.idx = idx


class EvaluatorMethods:
    """Faithfulness, curves, baselines, completeness and minimality from ``metric_of`` (node sets -> metrics),
    ``_universe`` and ``_components_only``; shared by the component and the feature circuit evaluators."""

    _universe: list[str]
    model: HookedModel
    metric_fn: MetricFn

    def metric_per_prompt(self, node_sets: Sequence[Iterable[str]]) -> Tensor:  # pragma: no cover - abstract
        """``[len(node_sets), n_pairs]`` metric of each prompt (in ``pairs`` order) with each node set."""
        raise NotImplementedError

    def metric_of(self, node_sets: Sequence[Iterable[str]]) -> list[float]:
        """``m(C)`` for each node set, averaged over the prompts."""
        per = self.metric_per_prompt(node_sets)
        return per.mean(1).tolist() if per.numel() else []

    def _components_only(self, nodes: Sequence[str]) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _metric_with_hooks(self, batch, V: int, hooks) -> Tensor:
        """``[V, b]`` metric of ``batch`` repeated ``V`` times (one variant per block of rows) under ``hooks``."""
        rep = _repeat_batch(batch, V)
        with torch.no_grad(), self.model.hooks(hooks):
            hidden = self.model.final_hidden(rep.tokens, rep.mask)
            m = self.metric_fn(self.model, hidden, rep)
        return m.double().cpu().reshape(V, batch.tokens.shape[0])

    def __call__(self, node_set: Iterable[str]) -> float:
        return self.metric_of([node_set])[0]

    # ------------------------------------------------------------------ inert nodes, relevant universe
    def _find_inert_nodes(self) -> list[str]:
        """Inert nodes of ``_universe`` (see module docstring). Default: none known (every node counts as
        relevant, the conservative choice); evaluators override it."""
        return []

    def inert_nodes(self) -> list[str]:
        """Nodes of the universe whose ablation is a no-op on every evaluated prompt (in universe order;
        computed once and cached)."""
        cached = getattr(self, "_inert_cache", None)
        if cached is None:
            found = set(self._find_inert_nodes())
            cached = [u for u in self._universe if u in found]
            self._inert_cache = cached
        return list(cached)

    @property
    def relevant_universe(self) -> list[str]:
        """The universe without its inert nodes, in universe order: the ``N`` of node shares, curves and
        matched baselines."""
        inert = set(self.inert_nodes())
        return [u for u in self._universe if u not in inert]

    def role_circuit(self, role: str, forced: Sequence[str] | None = None) -> list[str]:
        """Every relevant node at ``role`` (a role name, or ``"P<n>"`` for position-keyed evaluators), plus the
        ``forced`` nodes (e.g. the discovered circuit's embeddings): the "every last-token node" baseline
        circuit is ``role_circuit("last", forced=...)``."""
        places = {_place(u) for u in self._universe}
        if role not in places:
            raise InputError(f"role {role!r} is not in this evaluator's universe; use one of "
                             f"{', '.join(sorted(str(p) for p in places))}")
        nodes = [u for u in self.relevant_universe if _place(u) == role]
        extra = self._components_only(forced or [])
        return list(dict.fromkeys([*nodes, *extra]))

    def _ordered(self, ranked_nodes: Sequence[str], relevant_only: bool) -> list[str]:
        universe = self.relevant_universe if relevant_only else self._universe
        return curves.order_by_ranking(self._components_only(ranked_nodes), universe)

    def _references_if_missing(self, m_full, m_empty) -> tuple[float, float]:
        if m_full is None or m_empty is None:
            mf, me = self.references()
            m_full = mf if m_full is None else m_full
            m_empty = me if m_empty is None else m_empty
        return float(m_full), float(m_empty)

    # ------------------------------------------------------------------ conveniences (validation.curves)
    def references(self) -> tuple[float, float]:
        """``(m(N), m(∅))``."""
        mf, me = self.metric_of([self._universe, []])
        return mf, me

    def faithfulness(self, circuit: Iterable[str]) -> float:
        mc, mf, me = self.metric_of([list(circuit), self._universe, []])
        return float(curves.faithfulness(mc, mf, me))

    def faithfulness_per_prompt(self, circuit: Iterable[str]) -> list[float | None]:
        """Faithfulness of ``circuit`` on each prompt alone (``None`` where that prompt's ``m(N) == m(∅)``):
        one batched evaluation instead of one evaluator per prompt."""
        per = self.metric_per_prompt([list(circuit), self._universe, []])
        out: list[float | None] = []
        for mc, mf, me in per.T.tolist():
            try:
                out.append(float(curves.faithfulness(mc, mf, me)))
            except curves.DegenerateMetricError:
                out.append(None)
        return out

    def faithfulness_with_ci(self, circuit: Iterable[str], *, n_boot: int = 2000, seed: int = 0,
                             confidence: float = 0.95, min_gap: float = curves.DEFAULT_MIN_GAP) -> dict:
        """Faithfulness of ``circuit`` (ratio of prompt means) with a percentile-bootstrap CI over prompts, per-prompt
        values and the degenerate flag (``|mean(m(N) - m(∅))| < min_gap``: then no value); see
        :func:`curves.faithfulness_ci` for the keys. One batched evaluation."""
        per = self.metric_per_prompt([self._components_only(list(circuit)), self._universe, []])
        mc, mf, me = (per[i].tolist() for i in range(3))
        return curves.faithfulness_ci(mc, mf, me, n_boot=n_boot, seed=seed, confidence=confidence, min_gap=min_gap)

    def curve(self, ranked_nodes: Sequence[str], *, relevant_only: bool = True, m_full: float | None = None,
              m_empty: float | None = None, **kwargs) -> curves.FaithfulnessCurve:
        """:func:`curves.faithfulness_curve` over the relevant universe (``relevant_only=False``: the whole
        universe): the ranked nodes first (nodes outside it dropped), the unranked rest appended in universe
        order, so the 100% point is ``m(N)`` whatever subset was ranked. ``m_full``/``m_empty`` default to
        :meth:`references`."""
        order = self._ordered(ranked_nodes, relevant_only)
        if not order:
            raise InputError("every node is inert on these prompts (the clean and corrupted runs agree wherever a node "
                             "could be ablated), so no curve is defined: check the pairs' corruption "
                             "(faithfulness_with_ci reports this case as degenerate)")
        mf, me = self._references_if_missing(m_full, m_empty)
        return curves.faithfulness_curve(order, self.metric_of, batched=True, m_full=mf, m_empty=me, **kwargs)

    def faithfulness_at(self, ranked_nodes: Sequence[str], fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
                        *, m_full: float | None = None, m_empty: float | None = None,
                        relevant_only: bool = True) -> dict[float, float]:
        """``{fraction: f}`` of the top ``ceil(fraction * |relevant universe|)`` nodes (at least 1) of the ranking
        restricted to relevant nodes, the unranked relevant nodes appended in universe order."""
        fr = sorted(float(x) for x in fractions)
        c = self.curve(ranked_nodes, relevant_only=relevant_only, m_full=m_full, m_empty=m_empty, fractions=fr)
        return {x: float(f) for x, f in zip(fr, c.faithfulness)}

    def random_baseline(self, circuit: Sequence[str], n_samples: int = 100, **kwargs):
        """The plain uniform same-size draw over the whole universe (kept for comparison: a circuit that always
        keeps the subject embedding beats it by construction; use :meth:`matched_random_baseline`)."""
        return curves.random_circuit_baseline(self._components_only(circuit), self._universe, self.metric_of,
                                              n_samples=n_samples, batched=True, **kwargs)

    def _forced_nodes(self, C: list[str], forced: Sequence[str] | None) -> list[str]:
        if forced is None:
            F = [n for n in C if parse_component_id(n)[0] == "embed"]
        else:
            F = self._components_only(forced)
            extra = [n for n in F if n not in set(C)]
            if extra:
                raise InputError(f"forced node {extra[0]!r} is not in the circuit: forced nodes are circuit nodes "
                                 "that every random circuit keeps")
        inert = set(self.inert_nodes())
        # inert circuit nodes change nothing; keeping them in every random circuit keeps the sizes equal
        return list(dict.fromkeys([*F, *(n for n in C if n in inert)]))

    def matched_random_baseline(self, circuit: Sequence[str], *, forced: Sequence[str] | None = None,
                                n_samples: int = 100, seed: int = 0, m_full: float | None = None,
                                m_empty: float | None = None, stratum: Any = "component_layer_role",
                                alternative: Alternative = "greater") -> curves.RandomBaselineResult:
        """Random circuits = the circuit's ``forced`` nodes (default: its embedding nodes; its inert nodes are
        always added) + for each stratum as many nodes as the circuit has there, drawn uniformly from the
        relevant universe's nodes of that stratum.

        Args:
            stratum: ``"component_layer_role"`` (default, :func:`node_stratum`), ``"component_role"``,
                ``"component_layer"`` or a callable ``node -> hashable``. Note that with the default an MLP or
                attention-layer node is alone in its stratum, so it is always "matched" to itself: the test is
                then about the heads; check ``n_possible`` / ``min_p_attainable`` of the result.
        """
        C = list(dict.fromkeys(self._components_only(circuit)))
        F = self._forced_nodes(C, forced)
        key = _STRATA.get(stratum, stratum) if isinstance(stratum, str) else stratum
        if not callable(key):
            raise InputError(f"stratum must be one of {', '.join(_STRATA)} or a callable, got {stratum!r}")
        mf, me = self._references_if_missing(m_full, m_empty)
        return curves.random_circuit_baseline(C, self.relevant_universe, self.metric_of, n_samples=n_samples,
                                              forced=F, stratum=key, batched=True, seed=seed, m_full=mf,
                                              m_empty=me, alternative=alternative)

    def topm_random_baseline(self, circuit: Sequence[str], ranked: Sequence[str], *, m_factor: float = 2,
                             n_samples: int = 100, seed: int = 0, forced: Sequence[str] | None = None,
                             m_full: float | None = None, m_empty: float | None = None,
                             alternative: Alternative = "greater") -> curves.RandomBaselineResult:
        """Random circuits = ``forced`` (as in :meth:`matched_random_baseline`) + random subsets, of the circuit's
        non-forced size, of the top ``M = m_factor * |circuit|`` ranked relevant non-forced nodes."""
        C = list(dict.fromkeys(self._components_only(circuit)))
        F = self._forced_nodes(C, forced)
        relevant = set(self.relevant_universe)
        ranked_rel = [n for n in self._components_only(ranked) if n in relevant]
        mf, me = self._references_if_missing(m_full, m_empty)
        return curves.topm_random_baseline(C, ranked_rel, self.metric_of, m_factor=m_factor, n_samples=n_samples,
                                           forced=F, batched=True, seed=seed, m_full=mf, m_empty=me,
                                           alternative=alternative)

    def completeness(self, circuit: Sequence[str], **kwargs):
        return curves.completeness(self._components_only(circuit), self._universe, self.metric_of, batched=True,
                                   **kwargs)

    def minimality(self, circuit: Sequence[str], **kwargs):
        return curves.minimality(self._components_only(circuit), self.metric_of, batched=True, **kwargs)


class CircuitEvaluator(EvaluatorMethods):
    """``m(C)`` for component circuits on fact pairs (see module docstring).

    Args:
        model: a :class:`~circuit_discovery.models.HookedModel`.
        pairs: the :class:`~circuit_discovery.facts.FactPair` objects to evaluate on.
        metric: a metric name of :mod:`circuit_discovery.metrics` or ``metric(model, hidden, batch) -> [batch]``.
        ablation: ``"corrupted"`` | ``"mean"`` | ``"zero"``.
        granularity: ``"head"`` (heads as nodes) or ``"layer"`` (attention layers as nodes).
        keyed_by: ``"role"`` or ``"position"`` — the form of the universe's ids (both forms are accepted as input).
        reference: pairs whose clean runs define the mean for ``ablation="mean"`` (default ``pairs``).
        max_batch: rows per forward pass (variants x prompts).
    """

    def __init__(self, model, pairs: Sequence, metric: Any = "logit_diff", ablation: str = "corrupted",
                 granularity: str = "head", keyed_by: str = "role", reference: Sequence | None = None,
                 max_batch: int = 256) -> None:
        if not pairs:
            raise InputError("CircuitEvaluator needs at least one fact pair")
        if ablation not in ABLATIONS:
            raise InputError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
        if granularity not in ("head", "layer"):
            raise InputError(f"granularity must be 'head' or 'layer', got {granularity!r}")
        if keyed_by not in ("role", "position"):
            raise InputError(f"keyed_by must be 'role' or 'position', got {keyed_by!r}")
        if int(max_batch) < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        check_pairs(pairs)
        self.model, self.pairs = model, list(pairs)
        self.metric_fn = get_metric(metric)
        self.ablation, self.granularity, self.keyed_by = ablation, granularity, keyed_by
        self.max_batch = int(max_batch)
        self.n_evaluations = 0
        cfg = model.cfg
        L = cfg.n_layers
        self._attn_hook = "attn.hook_z" if granularity == "head" else "hook_attn_out"
        self.hook_names = ["hook_embed"] + [f"blocks.{l}.{self._attn_hook}" for l in range(L)] + \
                          [f"blocks.{l}.hook_mlp_out" for l in range(L)]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(self.pairs):
            by_len.setdefault(len(p.clean_tokens), []).append(i)
        ref_means: dict[int, dict[str, Tensor]] = {}
        if ablation == "mean":
            ref = list(reference) if reference is not None else self.pairs
            ref_by_len: dict[int, list] = {}
            for p in ref:
                ref_by_len.setdefault(len(p.clean_tokens), []).append(p)
            for n in by_len:
                if n not in ref_by_len:
                    raise InputError(f"mean ablation: no reference prompt of {n} tokens; give reference pairs of "
                                     f"every evaluated length ({sorted(by_len)})")
                b = batch_from_pairs(model, ref_by_len[n])
                _, cache = model.run_with_cache(b.tokens, names=self.hook_names, attention_mask=b.mask,
                                                return_logits=False)
                ref_means[n] = {k: v.mean(0, keepdim=True) for k, v in cache.items()}
        self._groups = []
        for n, idx in sorted(by_len.items()):
            g = _Group(self.pairs, idx)
            g.batch = batch_from_pairs(model, g.pairs)
            if ablation == "corrupted":
                cb = batch_from_pairs(model, g.pairs, corrupted=True)
                noise = PairInputs.from_pairs(model, g.pairs).noise  # ROME noise on the subject of noise pairs
                with model.hooks(noise_hook(noise)):
                    _, cache = model.run_with_cache(cb.tokens, names=self.hook_names, attention_mask=cb.mask,
                                                    return_logits=False)
                g.values = cache
            elif ablation == "mean":
                g.values = {k: v.expand(len(idx), *v.shape[1:]) for k, v in ref_means[n].items()}
            else:
                g.values = None
            self._groups.append(g)
        self._universe = self._build_universe()
        self._mask_cache: dict[str, list[tuple[str, Tensor]]] = {}

    # ------------------------------------------------------------------ universe
    def _build_universe(self) -> list[str]:
        cfg = self.model.cfg
        if self.keyed_by == "role":
            present = [r for r in ROLES if any(r in p.roles for p in self.pairs)]
            places: Sequence[str | int] = present
            fmt = lambda place: place  # noqa: E731
        else:
            n_max = max(len(p.clean_tokens) for p in self.pairs)
            places = list(range(n_max))
            fmt = lambda place: f"P{place}"  # noqa: E731
        ids = []
        for place in places:
            ids.append(f"embed/L-1/{fmt(place)}")
        for l in range(cfg.n_layers):
            for place in places:
                if self.granularity == "head":
                    ids += [f"head/L{l}/I{h}/{fmt(place)}" for h in range(cfg.n_heads)]
                else:
                    ids.append(f"attn_out/L{l}/{fmt(place)}")
                ids.append(f"mlp_out/L{l}/{fmt(place)}")
        return ids

    @property
    def universe(self) -> list[str]:
        """Every node id that can be ablated (``N``)."""
        return list(self._universe)

    def _find_inert_nodes(self) -> list[str]:
        """See the module docstring: one clean run per group compared with the ablation values."""
        eq_by_group: list[tuple[dict[str, Tensor], Tensor]] = []
        for g in self._groups:
            b = g.batch
            with torch.no_grad():
                _, clean = self.model.run_with_cache(b.tokens, names=self.hook_names, attention_mask=b.mask,
                                                     return_logits=False)
            eq: dict[str, Tensor] = {}
            pos_all: Tensor | None = None
            for name in self.hook_names:
                x = clean[name]
                v = torch.zeros_like(x) if g.values is None else g.values[name].to(x.device, x.dtype).expand_as(x)
                e = (x == v).all(-1).cpu()  # [b, pos] or [b, pos, heads] (hook_z: over d_head)
                eq[name] = e
                ep = e.all(-1) if e.ndim == 3 else e
                pos_all = ep if pos_all is None else pos_all & ep
            assert pos_all is not None  # hook_names is never empty
            prefix = torch.cumprod(pos_all.to(torch.int64), dim=1).bool()  # [b, pos]: every hook equal up to here
            eq_by_group.append((eq, prefix))
        out = []
        for node in self._universe:
            inert = True
            masks = self._node_masks(node)
            assert masks is not None  # the universe holds no logit nodes
            for (hook, m), (eq, prefix) in zip(masks, eq_by_group):
                if not bool(eq[hook][m].all()):
                    inert = False
                elif not node.startswith("embed/"):
                    pos = m.any(-1) if m.ndim == 3 else m
                    inert = bool(prefix[pos].all())
                if not inert:
                    break
            if inert:
                out.append(node)
        return out

    def _node_masks(self, node_id: str) -> list[tuple[str, Tensor]] | None:
        """Per group: ``(hook name, mask)`` where mask is ``[b, pos]`` (or ``[b, pos, heads]`` for heads)."""
        if node_id in self._mask_cache:
            return self._mask_cache[node_id]
        comp, layer, index, role, position = parse_component_id(node_id)
        if comp == "logit":
            return None
        if comp not in _COMPONENTS:
            raise InputError(f"node {node_id!r}: component {comp!r} cannot be ablated; use one of {_COMPONENTS}")
        if comp == "head" and self.granularity != "head" or comp == "attn_out" and self.granularity != "layer":
            raise InputError(f"node {node_id!r} does not match granularity={self.granularity!r}")
        L = self.model.cfg.n_layers
        if comp == "embed":
            hook = "hook_embed"
        elif not 0 <= layer < L:
            raise InputError(f"node {node_id!r}: layer {layer} out of range 0..{L - 1}")
        else:
            hook = (f"blocks.{layer}.{self._attn_hook}" if comp in ("head", "attn_out")
                    else f"blocks.{layer}.hook_mlp_out")
        if comp == "head" and (index is None or not 0 <= index < self.model.cfg.n_heads):
            raise InputError(f"node {node_id!r}: head index missing or out of range")
        if (role is None) == (position is None):
            raise InputError(f"node {node_id!r} needs exactly one of a role or a position P<n>")
        out = []
        for g in self._groups:
            b, n = g.batch.tokens.shape
            m = torch.zeros(b, n, dtype=torch.bool)
            if role is not None:
                for i, p in enumerate(g.pairs):
                    m[i] = torch.tensor([r == role for r in p.roles], dtype=torch.bool)
            elif position is not None and position < n:  # not None: exactly one of role, position (checked)
                m[:, position] = True
            if comp == "head":
                mh = torch.zeros(b, n, self.model.cfg.n_heads, dtype=torch.bool)
                mh[:, :, index] = m
                m = mh
            out.append((hook, m))
        self._mask_cache[node_id] = out
        return out

    # ------------------------------------------------------------------ evaluation
    def metric_per_prompt(self, node_sets: Sequence[Iterable[str]]) -> Tensor:
        """``[len(node_sets), n_pairs]`` metric of each prompt (in ``pairs`` order) with each node set."""
        sets = [list(s) for s in node_sets]
        total = torch.zeros(len(sets), len(self.pairs), dtype=torch.float64)
        if not sets:
            return total
        masks = [[m for m in (self._node_masks(i) for i in s) if m is not None] for s in sets]
        for gi, g in enumerate(self._groups):
            b, n = g.batch.tokens.shape
            per = max(1, self.max_batch // b)
            for c in range(0, len(sets), per):
                chunk = masks[c: c + per]
                V = len(chunk)
                keep = {}
                for name in self.hook_names:
                    shape = (V, b, n, self.model.cfg.n_heads) if name.endswith("hook_z") else (V, b, n)
                    keep[name] = torch.zeros(shape, dtype=torch.bool)
                for v, node_masks in enumerate(chunk):
                    for nm in node_masks:
                        hook, m = nm[gi]
                        keep[hook][v] |= m
                total[c: c + V, g.idx] = self._run(g, keep, V)
        self.n_evaluations += len(sets)
        return total

    def _run(self, g, keep: dict[str, Tensor], V: int) -> Tensor:
        b, n = g.batch.tokens.shape
        dev = self.model.device

        def make(name):
            k = keep[name].reshape(V * b, *keep[name].shape[2:]).to(dev)

            def fn(x, _name):
                kk = k[..., None]
                if g.values is None:
                    patch = torch.zeros((), dtype=x.dtype, device=x.device)
                else:
                    pv = g.values[name]
                    patch = pv.repeat(V, *([1] * (pv.ndim - 1))).to(x.dtype)
                return torch.where(kk, x, patch)
            return fn

        return self._metric_with_hooks(g.batch, V, [(name, make(name)) for name in self.hook_names])

    def _components_only(self, nodes: Sequence[str]) -> list[str]:
        out = []
        for i in nodes:
            if parse_component_id(i)[0] == "logit":
                continue
            self._node_masks(i)  # validates
            out.append(i)
        return out


def _repeat_batch(batch, V: int):
    from circuit_discovery.metrics import PromptBatch

    return PromptBatch(batch.tokens.repeat(V, 1), batch.mask.repeat(V, 1), batch.last.repeat(V),
                       batch.answer_ids * V, batch.cf_ids * V)
