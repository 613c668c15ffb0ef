"""Independent cross-check: TransformerLens 4's TransformerBridge booted on the same HF model."""
import tempfile

import pytest
import torch

from ..conftest import TINY

tl_bridge = pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens 4 (test extra) not installed")

HF_ARCH = {"tiny-gpt2": "GPT2LMHeadModel", "tiny-gemma": "GemmaForCausalLM", "tiny-gemma2": "Gemma2ForCausalLM",
           "tiny-gemma3": "Gemma3ForCausalLM", "tiny-llama": "LlamaForCausalLM"}
# float32, both eager attention on tiny models: identical up to accumulation order
TOL = 1e-4


def boot_bridge(model, arch):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:  # the bridge re-reads the tokenizer from its name_or_path
        model.tokenizer.save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        return tl_bridge.TransformerBridge.boot_transformers(
            model.cfg.model_name, hf_model=model.hf_model, tokenizer=tok,
            hf_config_overrides={"architectures": [arch]})


def compare(model, arch, prompt, tol):
    toks = model.to_tokens(prompt)
    ours_logits, ours = model.run_with_cache(toks, names=r"re:(hook_resid_pre|ln2\.hook_normalized|mlp\.hook_in)$")
    bridge = boot_bridge(model, arch)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(toks)
    worst = 0.0
    for l in range(model.cfg.n_layers):
        # ln2.hook_normalized: the MLP norm's input normalised before its gain (TransformerLens's meaning);
        # mlp.hook_in: the MLP's actual input, after the gain (what transcoders read)
        for k in (f"blocks.{l}.hook_resid_pre", f"blocks.{l}.ln2.hook_normalized", f"blocks.{l}.mlp.hook_in"):
            err = ((cache[k] - ours[k]).abs().max() / ours[k].abs().max()).item()
            assert err <= tol, f"{k} deviates by {err:.2e} (relative to max |activation|)"
            worst = max(worst, err)
    lerr = ((logits - ours_logits).abs().max() / ours_logits.abs().max()).item()
    assert worst <= tol, f"resid_pre deviates by {worst:.2e} (relative to max |activation|)"
    assert lerr <= tol, f"logits deviate by {lerr:.2e}"
    return worst, lerr


@pytest.mark.parametrize("name", TINY)
def test_bridge_matches_on_tiny(name):
    from circuit_discovery import load_model

    m = load_model(name, device="cpu")  # a fresh copy: the bridge may switch attention implementation
    try:
        compare(m, HF_ARCH[name], "The capital of France is", TOL)
    except (ValueError, NotImplementedError, KeyError) as e:
        if "support" in str(e).lower() or "architecture" in str(e).lower():
            pytest.skip(f"TransformerBridge does not support {HF_ARCH[name]}: {e}")
        raise
