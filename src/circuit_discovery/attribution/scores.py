"""``Scores``: the one result type of every attribution method.

A :class:`Scores` holds one value per (prompt, node)::

    values          [n_prompts, n_nodes]   float; NaN where a node does not exist for a prompt
                                           (a position past the end of a shorter prompt, a role it lacks)
    nodes           n_nodes Node objects   (component, layer, position, index)
    tokens          n_prompts lists of token strings (the labels of positions)
    roles           n_prompts lists of position roles (``bos``, ``subject_first``, ... see facts.ROLES)
    clean_metric    [n_prompts]            metric of the clean run (where the method has one)
    corrupted_metric[n_prompts]            metric of the corrupted run

Positions are token positions of each prompt. :meth:`Scores.by_role` aligns a relation's prompts by role:
it returns a new ``Scores`` whose node positions index :attr:`position_names` (the roles), so prompts of
different lengths and subject lengths can be averaged (:meth:`mean`). ``save``/``load`` write a folder with
``scores.safetensors`` (the tensors) and ``scores.json`` (nodes, labels, metadata); nothing is pickled.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.io import atomic_write_bytes, atomic_write_json, read_json
from circuit_discovery.nodes import Node

ROLE_ORDER = ("bos", "subject_first", "subject_middle", "subject_last", "relation_first", "relation", "last")
FORMAT = "circuit_discovery.scores/v1"


@dataclass
class Scores:
    """Attribution scores over nodes, per prompt (see the module docstring for the fields)."""

    nodes: list[Node]
    values: Tensor
    tokens: list[list[str]] = field(default_factory=list)
    roles: list[list[str]] = field(default_factory=list)
    clean_metric: Tensor | None = None
    corrupted_metric: Tensor | None = None
    method: str = ""
    metric: str = ""
    meta: dict = field(default_factory=dict)
    position_names: list[str] | None = None  # set when positions are roles (after by_role)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float64).detach().cpu()
        if self.values.ndim == 1:
            self.values = self.values[None]
        if self.values.ndim != 2 or self.values.shape[1] != len(self.nodes):
            raise InputError(f"values must be [n_prompts, n_nodes={len(self.nodes)}], got {tuple(self.values.shape)}")
        for name in ("clean_metric", "corrupted_metric"):
            v = getattr(self, name)
            if v is not None:
                v = torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(-1)
                if v.shape[0] != self.n_prompts:
                    raise InputError(f"{name} has {v.shape[0]} entries for {self.n_prompts} prompts")
                setattr(self, name, v)
        for name in ("tokens", "roles"):
            lst = getattr(self, name)
            if lst and len(lst) != self.n_prompts:
                raise InputError(f"{name} has {len(lst)} entries for {self.n_prompts} prompts")
        self._index = {n: i for i, n in enumerate(self.nodes)}
        if len(self._index) != len(self.nodes):
            raise InputError("duplicate nodes in Scores")

    # ------------------------------------------------------------------ access
    @property
    def n_prompts(self) -> int:
        return self.values.shape[0]

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, node: Node | str) -> Tensor:
        """Values of one node over prompts [n_prompts] (``node`` may be a Node or its key)."""
        if isinstance(node, str):
            node = Node.from_key(node)
        try:
            return self.values[:, self._index[node]]
        except KeyError:
            raise KeyError(f"node {node.key} is not in these scores") from None

    def mean(self) -> Tensor:
        """Mean over prompts, ignoring NaN [n_nodes]."""
        return torch.nanmean(self.values, dim=0)

    def normalized(self) -> Scores:
        """Values divided by the metric difference ``clean - corrupted`` of each prompt (1 = whole effect)."""
        if self.clean_metric is None or self.corrupted_metric is None:
            raise InputError("normalized() needs clean_metric and corrupted_metric")
        d = (self.clean_metric - self.corrupted_metric)[:, None]
        return self._replace(values=self.values / d, meta={**self.meta, "normalized": True})

    def _replace(self, **kw: Any) -> Scores:
        base: dict[str, Any] = dict(nodes=self.nodes, values=self.values, tokens=self.tokens, roles=self.roles,
                    clean_metric=self.clean_metric, corrupted_metric=self.corrupted_metric, method=self.method,
                    metric=self.metric, meta=dict(self.meta), position_names=self.position_names)
        base.update(kw)
        return Scores(**base)

    def components(self) -> list[str]:
        return list(dict.fromkeys(n.component for n in self.nodes))

    def position_label(self, prompt: int | None, position: int | None) -> str:
        if position is None:
            return "all"
        if self.position_names is not None:
            return self.position_names[position]
        if prompt is not None and self.tokens and position < len(self.tokens[prompt]):
            return self.tokens[prompt][position]
        return str(position)

    def per_prompt_array(self, component: str, index: int | None = None) -> np.ndarray:
        """Values of ``component`` as ``[n_prompts, n_layers, n_pos]`` (NaN where absent).

        For heads without positions the array is ``[n_prompts, n_layers, n_heads]``; ``index`` picks one head
        (or neuron/feature) of a per-position component.
        """
        sel = [(i, n) for i, n in enumerate(self.nodes) if n.component == component
               and (index is None or n.index == index)]
        if not sel:
            raise InputError(f"no {component!r} nodes in these scores (have {', '.join(self.components())})")
        layers = sorted({n.layer for _, n in sel})
        positional = any(n.position is not None for _, n in sel)
        by_index = component == "head" and not positional
        if not by_index:
            if any(n.position is None for _, n in sel):
                raise InputError(f"{component!r} mixes all-position and per-position nodes; pick one")
            if component == "head" and index is None and len({n.index for _, n in sel}) > 1:
                raise InputError("per-position head scores: pass index=<head> to per_prompt_array")

        def key(n: Node) -> int:
            col = n.index if by_index else n.position
            assert col is not None, f"{n.key} has no {'index' if by_index else 'position'}"
            return col

        cols = sorted({key(n) for _, n in sel})
        out = np.full((self.n_prompts, max(layers) + 1, max(cols) + 1), np.nan)
        v = self.values.numpy()
        for i, n in sel:
            out[:, n.layer, key(n)] = v[:, i]
        return out

    # ------------------------------------------------------------------ role alignment
    def by_role(self, reduce: str = "mean") -> Scores:
        """Scores aligned by position role: node positions index :attr:`position_names`.

        Per prompt, the values of the positions sharing a role (e.g. several middle subject tokens or several
        ``relation`` tokens) are combined with ``reduce`` (``"mean"`` or ``"sum"``); prompts without a role get
        NaN there. Nodes without a position are kept as they are.
        """
        if self.position_names is not None:
            return self
        if not self.roles:
            raise InputError("by_role() needs the prompts' roles (build Scores from FactPairs)")
        if reduce not in ("mean", "sum"):
            raise InputError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        present = {r for rs in self.roles for r in rs}
        names = [r for r in ROLE_ORDER if r in present] + sorted(present - set(ROLE_ORDER))
        ridx = {r: i for i, r in enumerate(names)}
        new_nodes: list[Node] = [n for n in self.nodes if n.position is None]
        base = list(dict.fromkeys(Node(n.component, n.layer, None, n.index) for n in self.nodes
                                  if n.position is not None))
        new_nodes += [Node(b.component, b.layer, ridx[r], b.index) for b in base for r in names]
        col = {nn: j for j, nn in enumerate(new_nodes)}
        acc = torch.zeros(self.n_prompts, len(new_nodes), dtype=torch.float64)
        cnt = torch.zeros_like(acc)
        for i, n in enumerate(self.nodes):
            v = self.values[:, i]
            if n.position is None:
                j = col[n]
                cnt[:, j] = torch.where(torch.isnan(v), 0.0, 1.0)
                acc[:, j] = torch.nan_to_num(v)
                continue
            for p in range(self.n_prompts):
                if n.position >= len(self.roles[p]) or math.isnan(float(v[p])):
                    continue
                j = col[Node(n.component, n.layer, ridx[self.roles[p][n.position]], n.index)]
                acc[p, j] += v[p]
                cnt[p, j] += 1
        if reduce == "mean":
            vals = torch.where(cnt > 0, acc / cnt.clamp(min=1), torch.full_like(acc, float("nan")))
        else:
            vals = torch.where(cnt > 0, acc, torch.full_like(acc, float("nan")))
        return self._replace(nodes=new_nodes, values=vals, position_names=names,
                             meta={**self.meta, "aligned_by": "role", "role_reduce": reduce})

    # ------------------------------------------------------------------ tables
    def to_dataframe(self, aggregate: bool = False):
        """A pandas DataFrame: one row per (prompt, node), or per node with ``aggregate=True`` (mean, std, n).

        Columns: ``prompt, node, component, layer, position, index, label, value`` (+ ``token``/``role``).
        """
        import pandas as pd

        v = self.values.numpy()
        rows = []
        if aggregate:
            with np.errstate(all="ignore"):
                n_ok = np.isfinite(v).sum(0)
                mean = np.where(n_ok > 0, np.nansum(v, 0) / np.maximum(n_ok, 1), np.nan)
                std = np.array([np.nanstd(c, ddof=1) if k > 1 else np.nan for c, k in zip(v.T, n_ok)])
            for j, n in enumerate(self.nodes):
                pos_lbl = self.position_label(0 if self.n_prompts else None, n.position)
                rows.append(dict(node=n.key, component=n.component, layer=n.layer, position=n.position,
                                 index=n.index, label=self._node_label(n, 0), position_label=pos_lbl,
                                 value=mean[j], std=std[j], n=int(n_ok[j])))
            return pd.DataFrame(rows)
        for p in range(self.n_prompts):
            for j, n in enumerate(self.nodes):
                if np.isnan(v[p, j]):
                    continue
                role = None
                if self.position_names is not None and n.position is not None:
                    role = self.position_names[n.position]
                elif self.roles and n.position is not None and n.position < len(self.roles[p]):
                    role = self.roles[p][n.position]
                rows.append(dict(prompt=p, node=n.key, component=n.component, layer=n.layer, position=n.position,
                                 index=n.index, label=self._node_label(n, p),
                                 token=self.position_label(p, n.position) if n.position is not None else None,
                                 role=role, value=v[p, j]))
        return pd.DataFrame(rows)

    def _node_label(self, n: Node, prompt: int) -> str:
        if self.position_names is not None:
            return n.label(self.position_names)
        return n.label(self.tokens[prompt] if self.tokens else None)

    def top(self, k: int = 10, absolute: bool = True) -> list[tuple[Node, float]]:
        """The ``k`` nodes with the largest mean score (by magnitude when ``absolute``)."""
        m = self.mean()
        key = m.abs() if absolute else m
        key = torch.nan_to_num(key, nan=-float("inf"))
        idx = torch.argsort(key, descending=True)[:k]
        return [(self.nodes[i], float(m[i])) for i in idx.tolist()]

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/scores.safetensors`` and ``path/scores.json`` atomically; returns the folder."""
        from safetensors.torch import save as st_save

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"values": self.values.contiguous()}
        if self.clean_metric is not None:
            tensors["clean_metric"] = self.clean_metric.contiguous()
        if self.corrupted_metric is not None:
            tensors["corrupted_metric"] = self.corrupted_metric.contiguous()
        atomic_write_bytes(folder / "scores.safetensors", st_save(tensors))
        atomic_write_json(folder / "scores.json", {
            "format": FORMAT, "method": self.method, "metric": self.metric,
            "nodes": [n.key for n in self.nodes], "tokens": self.tokens, "roles": self.roles,
            "position_names": self.position_names, "meta": _jsonable(self.meta)})
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> Scores:
        from safetensors.torch import load_file

        folder = Path(path)
        jpath, tpath = folder / "scores.json", folder / "scores.safetensors"
        if not jpath.exists() or not tpath.exists():
            raise InputError(f"{folder} is not a saved Scores folder (needs scores.json and scores.safetensors)")
        info = read_json(jpath)
        if info.get("format") != FORMAT:
            raise InputError(f"{jpath} has format {info.get('format')!r}, expected {FORMAT!r}")
        t = load_file(str(tpath))
        return cls(nodes=[Node.from_key(k) for k in info["nodes"]], values=t["values"], tokens=info["tokens"],
                   roles=info["roles"], clean_metric=t.get("clean_metric"),
                   corrupted_metric=t.get("corrupted_metric"), method=info["method"], metric=info["metric"],
                   meta=info["meta"], position_names=info["position_names"])

    # ------------------------------------------------------------------ plots
    def heatmap(self, component: str | None = None, prompt: int | None = None, *, path: str | os.PathLike,
                title: str | None = None, cmap: str = "RdBu_r", index: int | None = None) -> Path:
        """PNG heatmap of one component: layer x position (token or role labels), or layer x head for heads,
        drawn by :func:`circuit_discovery.report.figures.patching_heatmap` / ``head_heatmap`` as in the report.

        ``prompt`` picks one prompt; None averages over prompts (positions must then be aligned: call
        :meth:`by_role` first when prompts differ). Returns the written path.
        """
        from circuit_discovery.report.figures import (  # lazy: report sits above attribution
            head_heatmap,
            patching_heatmap,
        )

        component = component or self.components()[0]
        arr = self.per_prompt_array(component, index=index)
        if prompt is None:
            if self.position_names is None and len({len(t) for t in self.tokens}) > 1:
                raise InputError("prompts have different lengths: call by_role() before averaging a heatmap")
            with np.errstate(all="ignore"):
                data = np.nanmean(arr, axis=0)
        else:
            data = arr[prompt]
        title = title or f"{self.method} {component} ({self.metric})"
        label = f"score ({self.metric})"
        if component == "head" and all(n.position is None for n in self.nodes if n.component == "head"):
            return head_heatmap(data, title, path, cmap=cmap, colorbar_label=label)
        xlabels = [self.position_label(0 if prompt is None else prompt, p) for p in range(data.shape[1])]
        if self.position_names is None:
            xlabels = [repr(x) for x in xlabels]
        return patching_heatmap(data, xlabels, title, path, cmap=cmap, colorbar_label=label)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def scores_from_pairs(nodes: Sequence[Node], values: Tensor, model, pairs, **kw) -> Scores:
    """Build :class:`Scores` with token labels and roles taken from FactPairs (``pair.clean_tokens``)."""
    tokens = [[model.tokenizer.decode([t]) for t in p.clean_tokens] for p in pairs]
    roles = [list(p.roles) for p in pairs]
    return Scores(nodes=list(nodes), values=values, tokens=tokens, roles=roles, **kw)
