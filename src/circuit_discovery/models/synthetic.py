"""Models with the published shapes of real checkpoints and random weights, built in process (no download).

For cost measurements only (``benchmarks/scale.py``, :mod:`circuit_discovery.estimate`): the configurations below
hard-code the dimensions of the published ``config.json`` files; the weights are transformers' random
initialisation. ``n_layers`` builds the real width with fewer layers (the full Gemma 2 2B is 10.5 GB in float32),
and costs are scaled to the real depth by the caller.

The tokenizer: the built-in Gemma 3 tokenizer for the Gemma shapes when its cache folder exists (Gemma 2 and 3
share the first 256,000 token ids; a prompt with a larger id is refused), else the tiny test tokenizer (vocab 512).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from circuit_discovery.errors import ModelLoadError


@dataclass(frozen=True)
class Shape:
    """The published dimensions of a model (``config.json``), and its Hugging Face config class."""

    name: str
    config_class: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    tied: bool
    extra: tuple[tuple[str, Any], ...] = ()

    def params(self, n_layers: int | None = None) -> int:
        """Parameter count, as transformers builds the model (tied embeddings counted once)."""
        L = self.n_layers if n_layers is None else n_layers
        d, f, q, kv = self.d_model, self.d_mlp, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        embed = self.d_vocab * d * (1 if self.tied else 2)
        if self.config_class == "GPT2Config":  # fused qkv and MLP with biases, two LayerNorms, learned positions
            layer = 4 * d * d + 2 * d * f + (3 * d + d + f + d) + 4 * d
            return L * layer + embed + self.n_ctx * d + 2 * d
        layer = 2 * d * q + 2 * d * kv + 3 * d * f
        norms = {"Gemma2Config": 4 * d, "Gemma3TextConfig": 4 * d + 2 * self.d_head}.get(self.config_class, 2 * d)
        return L * (layer + norms) + embed + d

    def non_embedding_params(self, n_layers: int | None = None) -> int:
        L = self.n_layers if n_layers is None else n_layers
        return self.params(L) - self.params(0)


SHAPES: dict[str, Shape] = {
    # google/gemma-2-2b config.json
    "gemma-2-2b": Shape("gemma-2-2b", "Gemma2Config", n_layers=26, d_model=2304, d_mlp=9216, n_heads=8, n_kv_heads=4,
                        d_head=256, d_vocab=256000, n_ctx=8192, tied=True,
                        extra=(("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                               ("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
                               ("hidden_activation", "gelu_pytorch_tanh"), ("rms_norm_eps", 1e-6))),
    # openai-community/gpt2-xl config.json
    "gpt2-xl": Shape("gpt2-xl", "GPT2Config", n_layers=48, d_model=1600, d_mlp=6400, n_heads=25, n_kv_heads=25,
                     d_head=64, d_vocab=50257, n_ctx=1024, tied=True),
    # google/gemma-3-270m (the built-in model's dimensions)
    "gemma-3-270m": Shape("gemma-3-270m", "Gemma3TextConfig", n_layers=18, d_model=640, d_mlp=2048, n_heads=4,
                          n_kv_heads=1, d_head=256, d_vocab=262144, n_ctx=32768, tied=True,
                          extra=(("query_pre_attn_scalar", 256), ("sliding_window", 512),
                                 ("hidden_activation", "gelu_pytorch_tanh"), ("rms_norm_eps", 1e-6))),
}
ALIASES = {"google/gemma-2-2b": "gemma-2-2b", "gpt2-xl": "gpt2-xl", "openai-community/gpt2-xl": "gpt2-xl",
           "google/gemma-3-270m": "gemma-3-270m"}


def shape_of(name: str) -> Shape:
    key = ALIASES.get(name, name)
    if key not in SHAPES:
        raise ModelLoadError(f"no published shape for {name!r}; known shapes: {', '.join(SHAPES)}")
    return SHAPES[key]


def hf_config(shape: Shape, n_layers: int | None = None, vocab_size: int | None = None):
    """The transformers config of ``shape`` with ``n_layers`` layers (default: all)."""
    import transformers as tf

    L = shape.n_layers if n_layers is None else int(n_layers)
    if L < 1:
        raise ModelLoadError(f"n_layers must be >= 1, got {n_layers}")
    V = shape.d_vocab if vocab_size is None else vocab_size
    ids: dict[str, Any] = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if shape.config_class == "GPT2Config":
        return tf.GPT2Config(n_layer=L, n_embd=shape.d_model, n_head=shape.n_heads, n_inner=shape.d_mlp,
                             n_positions=shape.n_ctx, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             tie_word_embeddings=shape.tied, **ids)
    kw: dict[str, Any] = dict(num_hidden_layers=L, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                              num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
                              head_dim=shape.d_head, vocab_size=V, max_position_embeddings=shape.n_ctx,
                              tie_word_embeddings=shape.tied, **dict(shape.extra), **ids)
    if shape.config_class == "Gemma3TextConfig":
        kw["layer_types"] = [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(L)]
    return getattr(tf, shape.config_class)(**kw)


def _tokenizer(shape: Shape, cache_dir=None):
    from circuit_discovery.models.loading import cache_root, tiny_tokenizer

    if shape.config_class.startswith("Gemma"):
        folder = cache_root(cache_dir) / "models" / "gemma-3-270m"
        if (folder / "tokenizer.json").is_file():
            from circuit_discovery.models.fastload import load_tokenizer

            return load_tokenizer(folder), "gemma-3 tokenizer (built-in cache)"
    return tiny_tokenizer(), "tiny test tokenizer (vocab 512)"


class _VocabGuard:
    """Refuses token ids outside a model's vocabulary with one clear line (instead of an index error)."""

    def __init__(self, d_vocab: int):
        self.d_vocab = d_vocab

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.numel() and int(ids.max()) >= self.d_vocab:
            from circuit_discovery.errors import InputError

            raise InputError(f"token id {int(ids.max())} is outside the synthetic model's vocabulary of "
                             f"{self.d_vocab}; use prompts of plain text")


@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int, gpt2: bool) -> None:
    """Matrices N(0, 0.02) (transformers' ``initializer_range``), biases 0, norm gains at the identity (GPT-2's
    LayerNorm weight 1; Gemma's RMSNorm stores ``1 + w``, so 0). One pass per tensor: transformers' own
    initialisation of the 2B shape takes minutes on a loaded CPU."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif gpt2 and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_shaped(name: str, n_layers: int | None = None, *, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cache_dir=None):
    """A :class:`~circuit_discovery.models.HookedModel` with the published shape of ``name`` (``gemma-2-2b``,
    ``gpt2-xl``, ``gemma-3-270m``), ``n_layers`` layers (default: all) and random weights (transformers'
    initialisation from ``seed``). ``model.cfg.extra["synthetic"]`` records the shape, the layer count and the
    tokenizer used."""
    from transformers import AutoModelForCausalLM

    from circuit_discovery.models.arch import arch_for
    from circuit_discovery.models.hooked import HookedModel

    shape = shape_of(name)
    tok, tok_note = _tokenizer(shape, cache_dir)
    config = hf_config(shape, n_layers)
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.tie_weights()  # no_init_weights also skips the tying that from_config does after initialising
    _random_init(hf, seed, gpt2=shape.config_class == "GPT2Config")
    hf.get_input_embeddings().register_forward_pre_hook(_VocabGuard(shape.d_vocab), with_kwargs=True)
    model = HookedModel(hf.eval(), tok, arch_for(hf.config.model_type), model_name=f"{shape.name}-shaped")
    model.cfg.extra["synthetic"] = {"shape": shape.name, "n_layers": config.num_hidden_layers
                                    if hasattr(config, "num_hidden_layers") else config.n_layer,
                                    "real_n_layers": shape.n_layers, "tokenizer": tok_note,
                                    "params": sum(p.numel() for p in hf.parameters())}
    return model
