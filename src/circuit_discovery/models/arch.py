"""One small table per architecture: where each TransformerLens hook lives in a Hugging Face model.

Each entry names module paths. Paths in ``base``/``embed``/... are relative to the ``*ForCausalLM`` model;
per-layer paths are relative to one decoder layer. The hook is read (and may be replaced) at:

* ``attn_out`` / ``mlp_out``: the *output* of that module -- what is added to the residual stream. For Gemma 2/3
  these are the post-norms (``post_attention_layernorm``, ``post_feedforward_layernorm``).
* ``z_proj`` / ``mlp_post_proj``: the *input* of that module (the attention output projection sees the
  concatenated per-head ``z``; the MLP down projection sees the post-activation ``hook_post``).
* ``ln2``: the norm in front of the MLP: its *output* is ``blocks.{l}.mlp.hook_in`` (after the gain; its pre-gain
  value is ``blocks.{l}.ln2.hook_normalized``, TransformerLens's meaning); its *input* is
  ``blocks.{l}.hook_mlp_in``.
* ``ln1``: the norm in front of the attention; its *input* is ``blocks.{l}.hook_attn_in`` (equal in value to
  ``hook_resid_pre``, but a gradient there flows through the attention only, as edge attribution needs).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    base: str
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_out: str
    mlp_out: str
    z_proj: str
    mlp_post_proj: str
    ln2: str
    ln1: str = "input_layernorm"
    pos_embed: str | None = None
    softcap_attr: str | None = None  # config attribute holding the final-logit soft cap, if any


_GEMMA_POSTNORM = dict(
    base="model", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
    z_proj="self_attn.o_proj", mlp_post_proj="mlp.down_proj", ln2="pre_feedforward_layernorm",
    softcap_attr="final_logit_softcapping",
)
_LLAMA_LIKE = dict(
    base="model", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    attn="self_attn", attn_out="self_attn", mlp_out="mlp", z_proj="self_attn.o_proj",
    mlp_post_proj="mlp.down_proj", ln2="post_attention_layernorm",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        base="transformer", layers="transformer.h", embed="transformer.wte", pos_embed="transformer.wpe",
        final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_out="attn", mlp_out="mlp",
        z_proj="attn.c_proj", mlp_post_proj="mlp.c_proj", ln2="ln_2", ln1="ln_1",
    ),
    "llama": ArchSpec(**_LLAMA_LIKE),
    "mistral": ArchSpec(**_LLAMA_LIKE),
    "qwen2": ArchSpec(**_LLAMA_LIKE),
    "gemma": ArchSpec(**_LLAMA_LIKE),
    "gemma2": ArchSpec(**_GEMMA_POSTNORM),
    "gemma3_text": ArchSpec(**_GEMMA_POSTNORM),
}


def arch_for(model_type: str) -> ArchSpec:
    from circuit_discovery.errors import ModelLoadError

    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ModelLoadError(
            f"architecture {model_type!r} has no hook table; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "Add one to circuit_discovery.models.arch.ARCHITECTURES."
        ) from None


def get_module(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod
