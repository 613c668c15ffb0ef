"""Hook names of published dictionaries in this project's names (``HookedModel.hook_names()``).

Three vocabularies reach the loader:

* **TransformerLens names** (SAELens ``hook_name``, circuit-tracer ``feature_input_hook``): mapped 1:1 where they
  mean the same here (``hook_embed``, ``blocks.L.hook_resid_pre/mid/post``, ``hook_attn_in``, ``hook_attn_out``,
  ``hook_mlp_in``, ``ln2.hook_normalized`` -- the MLP norm's normalised input before the gain --, ``mlp.hook_in``
  -- the MLP's input after the gain --, ``mlp.hook_post``, ``hook_mlp_out``, ``attn.hook_z``); TransformerLens
  bridge ``ln2.hook_out`` is ``mlp.hook_in``; ``mlp.hook_out`` / ``attn.hook_out`` (the MLP/attention module's
  own output) are ``hook_mlp_out`` / ``hook_attn_out`` where the model has no norm after that module.
* **Hugging Face module paths** (sparsify hookpoints ``layers.3.mlp``, Gemma Scope 2 ``hf_hook_point_in``
  ``model.layers.3.pre_feedforward_layernorm.output``): mapped through this project's architecture table
  (:data:`circuit_discovery.models.arch.ARCHITECTURES`), which says at which module each hook is read, so the
  mapping is exact by construction.
* The **Gemma 2/3 post-norm caveat**: there the MLP (attention) module's output is normalised again by
  ``post_feedforward_layernorm`` (``post_attention_layernorm``) before it joins the residual stream, and this
  project's ``hook_mlp_out`` (``hook_attn_out``) is *after* that norm. An RMS norm is not linear, so a dictionary
  that writes the module's raw output cannot be converted into one that writes ``hook_mlp_out``: such a hook is
  a :class:`DictionaryFormatError` naming it. Which models have the norm is decided from the model name in the
  dictionary's files or the ``model=`` argument; when neither says, a hook whose meaning depends on it is an error
  asking for ``model=``.
"""
from __future__ import annotations

import re

from circuit_discovery.models.arch import ARCHITECTURES as MODEL_ARCHS
from circuit_discovery.models.arch import ArchSpec
from circuit_discovery.sae.pretrained_base import DictionaryFormatError

__all__ = ["map_hook_name", "map_hf_hook", "model_family", "HookMapping"]

_SAME = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_in", "hook_attn_out", "hook_mlp_in",
         "hook_mlp_out", "mlp.hook_post", "ln2.hook_normalized", "mlp.hook_in", "attn.hook_z")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FAMILIES = (  # (regex on a model name or Hugging Face model_type, key of models.arch.ARCHITECTURES)
    (re.compile(r"gemma[-_]?3(?!\d*b)", re.I), "gemma3_text"),
    (re.compile(r"gemma[-_]?2(?!\d*b)", re.I), "gemma2"),
    (re.compile(r"gemma", re.I), "gemma"),
    (re.compile(r"gpt-?2|distilgpt2", re.I), "gpt2"),
    (re.compile(r"llama", re.I), "llama"),
    (re.compile(r"mistral", re.I), "mistral"),
    (re.compile(r"qwen[-_]?2", re.I), "qwen2"),
)
_POSTNORM_REASON = (
    "in {family} the {what} module's output is normalised again by {norm} before it joins the residual stream; "
    "this project's {ours} is after that norm and an RMS norm is not linear, so the dictionary cannot be "
    "converted exactly; use a dictionary that writes {ours_hf} (SAELens/TransformerLens {ours})")


def model_family(model: str | None) -> str | None:
    """The key of this project's architecture table for a model name or ``model_type`` (``None`` if unknown)."""
    if not model:
        return None
    for rx, key in _FAMILIES:
        if rx.search(model):
            return key
    return None


class HookMapping:
    """Maps hook names of one dictionary (knowing, if anything, which model it was trained on)."""

    def __init__(self, model: str | None = None, where: str = ""):
        self.model = model
        self.family = model_family(model)
        self.spec: ArchSpec | None = MODEL_ARCHS.get(self.family) if self.family else None
        self.where = where

    def _err(self, msg: str) -> DictionaryFormatError:
        return DictionaryFormatError(f"{self.where + ': ' if self.where else ''}{msg}")

    def _need_spec(self, name: str) -> ArchSpec:
        if self.spec is None:
            known = f"model {self.model!r} is not one of {sorted(MODEL_ARCHS)}" if self.model else \
                "the files do not say which model the dictionary belongs to"
            raise self._err(f"hook {name!r}: its meaning depends on the model (Gemma 2/3 normalise the MLP and "
                            f"attention outputs again) and {known}; pass model='<model name>' to the loader")
        return self.spec

    def _module_output(self, layer: int, what: str, name: str) -> str:
        """``hook_mlp_out``/``hook_attn_out`` for the MLP/attention module's own output, if that is what joins
        the residual stream in this model; else the post-norm error."""
        spec = self._need_spec(name)
        module, out = (("mlp", spec.mlp_out) if what == "mlp" else (spec.attn, spec.attn_out))
        ours = f"blocks.{layer}.hook_{what}_out" if what == "mlp" else f"blocks.{layer}.hook_attn_out"
        if out == module:
            return ours
        raise self._err(f"hook {name!r}: " + _POSTNORM_REASON.format(
            family=self.family, what="MLP" if what == "mlp" else "attention", norm=out, ours=ours,
            ours_hf=f"model.layers.{layer}.{out}.output"))

    def tl(self, name: str | None) -> str | None:
        """This project's hook for a TransformerLens/SAELens/circuit-tracer hook ``name`` (``None`` stays ``None``)."""
        if name is None or name == "":
            return None
        if not isinstance(name, str):
            raise self._err(f"hook name {name!r} must be a string")
        if name in ("hook_embed", "hook_pos_embed"):
            return name
        m = _BLOCK_RE.match(name)
        if m:
            layer, site = int(m.group(1)), m.group(2)
            if site in _SAME:
                return name
            if site == "ln2.hook_out":  # TransformerLens bridge: the norm's output, after the gain
                return f"blocks.{layer}.mlp.hook_in"
            if site == "mlp.hook_out":
                return self._module_output(layer, "mlp", name)
            if site == "attn.hook_out":
                return self._module_output(layer, "attn", name)
        raise self._err(f"hook_name={name!r} has no counterpart among this project's hooks (supported: hook_embed, "
                        f"hook_pos_embed, blocks.L.{{{', '.join(_SAME)}, ln2.hook_out, mlp.hook_out, "
                        "attn.hook_out}})")

    def hf(self, point: str, *, default_io: str = "output") -> str:
        """This project's hook for a Hugging Face module path, read at the module's ``input`` or ``output``
        (a trailing ``.input``/``.output`` in ``point`` wins over ``default_io``)."""
        if not isinstance(point, str) or not point:
            raise self._err(f"hook point {point!r} must be a non-empty string")
        path, io = point, default_io
        for suffix in (".input", ".output"):
            if path.endswith(suffix):
                path, io = path[: -len(suffix)], suffix[1:]
        spec = self.spec
        prefixes = ("model.language_model.", "language_model.", "model.", "transformer.", "base_model.")
        for p in prefixes:
            if path.startswith(p):
                path = path[len(p):]
                break
        layers_rel = spec.layers.split(".")[-1] if spec else None
        m = re.match(r"^(layers|h)\.(\d+)(?:\.(.+))?$", path)
        if m and (layers_rel is None or m.group(1) == layers_rel):
            layer, sub = int(m.group(2)), m.group(3)
            if sub is None:  # the decoder layer itself: the same in every architecture
                return f"blocks.{layer}.hook_resid_post" if io == "output" else f"blocks.{layer}.hook_resid_pre"
            spec = self._need_spec(point)
            table = {
                (spec.ln2, "output"): f"blocks.{layer}.mlp.hook_in",
                (spec.ln2, "input"): f"blocks.{layer}.hook_resid_mid",
                (spec.mlp_out, "output"): f"blocks.{layer}.hook_mlp_out",
                (spec.attn_out, "output"): f"blocks.{layer}.hook_attn_out",
                (spec.ln1, "input"): f"blocks.{layer}.hook_resid_pre",
                (spec.z_proj, "input"): f"blocks.{layer}.attn.hook_z",
                (spec.mlp_post_proj, "input"): f"blocks.{layer}.mlp.hook_post",
                ("mlp", "input"): f"blocks.{layer}.mlp.hook_in",
            }
            if (sub, io) in table:
                return table[(sub, io)]
            if (sub, io) == ("mlp", "output"):
                return self._module_output(layer, "mlp", point)
            if (sub, io) == (spec.attn, "output"):
                return self._module_output(layer, "attn", point)
            # the input of a post-norm is the module's raw output (raises the post-norm error)
            if io == "input" and sub == spec.mlp_out and spec.mlp_out != "mlp":
                return self._module_output(layer, "mlp", point)
            if io == "input" and sub == spec.attn_out and spec.attn_out != spec.attn:
                return self._module_output(layer, "attn", point)
        elif io == "output" and path == (spec.embed.split(".")[-1] if spec else path) \
                and path in ("embed_tokens", "wte"):
            return "hook_embed"
        raise self._err(f"hook point {point!r} ({io}) has no counterpart among this project's hooks")


def map_hook_name(name: str | None, *, model: str | None = None) -> str | None:
    """This project's hook for a TransformerLens/SAELens/circuit-tracer hook name; ``model`` (a model name or
    ``model_type``) decides ``mlp.hook_out``/``attn.hook_out``. Raises :class:`DictionaryFormatError`."""
    return HookMapping(model).tl(name)


def map_hf_hook(point: str, *, model: str | None = None, default_io: str = "output") -> str:
    """This project's hook for a Hugging Face module path (``layers.3.mlp``, ``model.layers.3.output``)."""
    return HookMapping(model).hf(point, default_io=default_io)
