"""Models with published shapes and random weights (``models.synthetic``): the configurations match the published
checkpoints, and a few-layer build runs through ``HookedModel``."""
import pytest
import torch

from circuit_discovery.errors import InputError, ModelLoadError
from circuit_discovery.models.synthetic import SHAPES, build_shaped, hf_config, shape_of

# parameter counts published for the checkpoints (Hugging Face model cards / safetensors metadata)
PUBLISHED_PARAMS = {"gemma-2-2b": 2_614_341_888, "gpt2-xl": 1_557_611_200, "gemma-3-270m": 268_098_176}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_full_depth_parameter_count_is_the_published_one(name):
    """Oracle: the published parameter count, against the model transformers builds (on the meta device: no memory)
    and against the closed form ``Shape.params``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(SHAPES[name]))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name] == SHAPES[name].params()


def test_gemma2_2b_config_has_the_published_values():
    c = hf_config(shape_of("google/gemma-2-2b"))
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size) == (26, 2304, 9216, 8, 4, 256, 256000)
    assert (c.final_logit_softcapping, c.attn_logit_softcapping, c.query_pre_attn_scalar, c.sliding_window) == \
        (30.0, 50.0, 256, 4096)
    assert hf_config(shape_of("gemma-2-2b"), n_layers=3).num_hidden_layers == 3


def test_few_layer_build_runs_with_hooks():
    m = build_shaped("gpt2-xl", n_layers=1)
    assert m.cfg.d_model == 1600 and m.cfg.n_layers == 1 and m.cfg.d_vocab == 50257
    assert sum(p.numel() for p in m.hf_model.parameters()) == SHAPES["gpt2-xl"].params(1)
    toks = m.to_tokens("The capital of France is")
    logits, cache = m.run_with_cache(toks, names=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"])
    assert logits.shape == (1, toks.shape[1], 50257)
    assert cache["blocks.0.attn.hook_z"].shape == (1, toks.shape[1], 25, 64)
    w = m.hf_model.transformer.h[0].attn.c_attn.weight
    assert abs(float(w.std()) - 0.02) < 0.001  # N(0, 0.02): transformers' initializer_range
    with pytest.raises(InputError, match="outside the synthetic model's vocabulary"):
        m(torch.tensor([[50257]]))


def test_unknown_shape_is_a_typed_error():
    with pytest.raises(ModelLoadError, match="no published shape"):
        shape_of("llama-70b")
    with pytest.raises(ModelLoadError, match="n_layers must be >= 1"):
        hf_config(shape_of("gpt2-xl"), n_layers=0)
