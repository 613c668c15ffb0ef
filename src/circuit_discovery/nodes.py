"""The node vocabulary shared by every attribution method, SAE features and graphs.

A node is one place in the model whose activation can be read and changed:

==============  ========================================  =====================================
component       hook                                      index
==============  ========================================  =====================================
``embed``       ``hook_embed``                            --
``resid_pre``   ``blocks.{l}.hook_resid_pre``             --
``resid_mid``   ``blocks.{l}.hook_resid_mid``             --
``resid_post``  ``blocks.{l}.hook_resid_post``            --
``attn_out``    ``blocks.{l}.hook_attn_out``              --
``mlp_out``     ``blocks.{l}.hook_mlp_out``               --
``head``        ``blocks.{l}.attn.hook_z``                head
``neuron``      ``blocks.{l}.mlp.hook_post``              neuron
``feature``     the SAE's hook (``hook_name``)            feature id
``error``       the SAE's hook                            --
``logit``       (output)                                  token id
==============  ========================================  =====================================

``position`` is a token position, or ``None`` for "all positions" (e.g. a head patched everywhere).
``layer`` is -1 for ``embed`` and ``n_layers`` for ``logit``.
"""
from __future__ import annotations

from dataclasses import dataclass

COMPONENT_HOOKS = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
    "neuron": "blocks.{layer}.mlp.hook_post",
}
COMPONENTS = tuple(COMPONENT_HOOKS) + ("feature", "error", "logit")


@dataclass(frozen=True, order=True)
class Node:
    component: str
    layer: int
    position: int | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown node component {self.component!r}; expected one of {COMPONENTS}")

    @property
    def hook_name(self) -> str | None:
        tmpl = COMPONENT_HOOKS.get(self.component)
        return tmpl.format(layer=self.layer) if tmpl else None

    @property
    def key(self) -> str:
        """Compact, unique, file-name-safe identifier, e.g. ``mlp_out/L5/P3`` or ``head/L4/H2``."""
        parts = [self.component, f"L{self.layer}"]
        if self.index is not None:
            parts.append(f"I{self.index}")
        if self.position is not None:
            parts.append(f"P{self.position}")
        return "/".join(parts)

    @classmethod
    def from_key(cls, key: str) -> Node:
        comp, *rest = key.split("/")
        layer = position = index = None
        for part in rest:
            tag, val = part[0], int(part[1:])
            if tag == "L":
                layer = val
            elif tag == "P":
                position = val
            elif tag == "I":
                index = val
            else:
                raise ValueError(f"bad node key {key!r}")
        if layer is None:
            raise ValueError(f"bad node key {key!r}: no layer")
        return cls(comp, layer, position, index)

    def label(self, tokens: list[str] | None = None) -> str:
        """Human label, e.g. ``L5 MLP @ ' Tower'``, ``L4.H2``."""
        short = {"embed": "Emb", "resid_pre": "Resid", "resid_mid": "ResidMid", "resid_post": "ResidPost",
                 "attn_out": "Attn", "mlp_out": "MLP", "head": "H", "neuron": "N", "feature": "F",
                 "error": "Err", "logit": "Logit"}[self.component]
        if self.component in ("head", "neuron", "feature"):
            s = f"L{self.layer}.{short}{self.index}"
        elif self.component == "logit":
            s = "Logit" if self.index is None else f"Logit {self.index}"
        elif self.component == "embed":
            s = "Emb"
        else:
            s = f"L{self.layer} {short}"
        if self.position is not None:
            tok = tokens[self.position] if tokens is not None and 0 <= self.position < len(tokens) else None
            s += f" @ {tok!r}" if tok is not None else f" @ {self.position}"
        return s
