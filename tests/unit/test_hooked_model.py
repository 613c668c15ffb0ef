"""Hook identities on every tiny architecture (random weights, random norms)."""
import pytest
import torch

from circuit_discovery.errors import DeviceError, HookError, InputError, ModelLoadError
from circuit_discovery.models import load_model

from ..conftest import TINY

PROMPTS = ["The capital of France is", "Big Ben is located in"]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", TINY)
def test_residual_identities(tiny_models, name):
    m = tiny_models[name]
    toks, mask = m.tokenize(PROMPTS)
    logits, cache = m.run_with_cache(toks, attention_mask=mask)
    L = m.cfg.n_layers
    for l in range(L):
        pre, mid, post = (cache[f"blocks.{l}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        attn, mlp = cache[f"blocks.{l}.hook_attn_out"], cache[f"blocks.{l}.hook_mlp_out"]
        assert rel(pre + attn, mid) <= 1e-5
        assert rel(pre + attn + mlp, post) <= 1e-5
        assert torch.equal(cache[f"blocks.{l}.hook_attn_in"], pre)
        assert rel(cache[f"blocks.{l}.hook_mlp_in"], mid) <= 1e-5
        if l + 1 < L:
            assert torch.equal(post, cache[f"blocks.{l + 1}.hook_resid_pre"])
    # final norm + unembedding of the last resid_post reproduce the logits
    recon = m.unembed(m.final_norm(cache[f"blocks.{L - 1}.hook_resid_post"]))
    assert rel(recon, logits) <= 1e-5
    # resid_pre of layer 0 is the embedding (plus GPT-2's position embedding)
    emb = cache["hook_embed"] + cache.get("hook_pos_embed", 0)
    assert rel(emb, cache["blocks.0.hook_resid_pre"]) <= 1e-6


@pytest.mark.parametrize("name", TINY)
def test_hook_z_through_output_projection_sums_to_attention(tiny_models, name):
    m = tiny_models[name]
    toks = m.to_tokens(PROMPTS)
    _, cache = m.run_with_cache(toks)
    from circuit_discovery.models.arch import get_module

    for l in range(m.cfg.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"]  # [b, p, h, d_head]
        assert z.shape[2:] == (m.cfg.n_heads, m.cfg.d_head)
        layer = get_module(m.hf_model, m.spec.layers)[l]
        proj = get_module(layer, m.spec.z_proj)
        W = proj.weight.T if type(proj).__name__ == "Conv1D" else proj.weight  # Conv1D stores [in, out]
        per_head = torch.einsum("bphd,ohd->bpho", z, W.view(m.cfg.d_model, m.cfg.n_heads, m.cfg.d_head))
        total = per_head.sum(2) + (proj.bias if getattr(proj, "bias", None) is not None else 0)
        attn_module_out = {}
        h = get_module(layer, m.spec.attn).register_forward_hook(
            lambda mod, a, o: attn_module_out.setdefault("o", o[0] if isinstance(o, tuple) else o))
        m(toks)
        h.remove()
        assert rel(total, attn_module_out["o"]) <= 1e-5


@pytest.mark.parametrize("name", TINY)
def test_interventions(tiny_models, name):
    m = tiny_models[name]
    toks = m.to_tokens(PROMPTS)
    base = m(toks)
    # identity hooks change nothing
    for hn in ("blocks.1.hook_attn_in", "blocks.1.hook_mlp_in", "hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.attn.hook_z",
               "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_attn_out"):
        with m.hooks([(hn, lambda x, n: x.clone())]):
            assert torch.allclose(m(toks), base, atol=1e-6), hn
    # editing resid_mid == editing attn_out by the same delta
    d = torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with m.hooks([("blocks.1.hook_resid_mid", lambda x, n: x + d)]):
        a = m(toks)
    with m.hooks([("blocks.1.hook_attn_out", lambda x, n: x + d)]):
        b = m(toks)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-4)
    # patching a whole resid_pre from another run reproduces that run downstream
    other = m.to_tokens(["Mount Fuji is in Japan", "The Colosseum is in"])[:, : toks.shape[1]]
    _, oc = m.run_with_cache(other, names=["blocks.1.hook_resid_pre"])
    with m.hooks([("blocks.1.hook_resid_pre", lambda x, n: oc[n])]):
        patched = m(toks, attention_mask=m.infer_attention_mask(other))
    assert torch.allclose(patched, m(other), atol=1e-5)
    # starting at a layer from cached activations equals the full run
    _, c2 = m.run_with_cache(toks, names=["blocks.2.hook_resid_pre"])
    with m.start_at_layer(2, c2["blocks.2.hook_resid_pre"]):
        assert torch.allclose(m(toks), base, atol=1e-5)
    assert torch.allclose(m(toks), base)  # layers restored
    # zero-ablating one head's z changes the output only through that head
    with m.hooks([("blocks.0.attn.hook_z", lambda z, n: torch.cat([z[:, :, :1] * 0, z[:, :, 1:]], 2))]):
        assert not torch.allclose(m(toks), base, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_last_logits_and_padding(tiny_models, name):
    m = tiny_models[name]
    toks, mask = m.tokenize(PROMPTS)  # different lengths -> right padding
    full = m(toks, attention_mask=mask)
    last = m.last_logits(toks, attention_mask=mask)
    idx = mask.sum(1) - 1
    assert torch.allclose(last, full[torch.arange(2), idx], atol=1e-5)
    for i, p in enumerate(PROMPTS):  # padding does not change a row's logits
        alone = m.last_logits(m.to_tokens(p))
        assert torch.allclose(alone[0], last[i], atol=1e-4)
    sub = m.last_logits(toks, attention_mask=mask, token_ids=[5, 7, 11])
    assert torch.allclose(sub, last[:, [5, 7, 11]], atol=1e-5)
    assert torch.equal(m.infer_attention_mask(toks), mask)


def test_gradients_at_a_hook(tiny_models):
    m = tiny_models["tiny-gemma3"]
    toks = m.to_tokens(PROMPTS[0])
    store = {}

    def grab(x, n):
        x.retain_grad()
        store[n] = x
    with m.hooks([("blocks.1.hook_resid_pre", grab)]):
        m.last_logits(toks)[0, 5].backward()
    g = store["blocks.1.hook_resid_pre"].grad
    assert g is not None and g.shape == store["blocks.1.hook_resid_pre"].shape and g.abs().sum() > 0


def test_errors(tiny_models):
    m = tiny_models["tiny-llama"]
    with pytest.raises(HookError, match="unknown hook"):
        with m.hooks([("blocks.99.hook_resid_pre", lambda x, n: x)]):
            pass
    with pytest.raises(InputError, match="longer than"):
        m.to_tokens("word " * 500)
    with pytest.raises(ModelLoadError, match="gemma-3-270m"):
        load_model("tiny-nonexistent")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_model("tiny-gpt2", device="cuda")
    with pytest.raises(ModelLoadError, match="built-in"):
        load_model("gemma")


def test_tiny_models_are_deterministic():
    a, b = load_model("tiny-gemma2"), load_model("tiny-gemma2")
    t = a.to_tokens("The capital of Italy is")
    assert torch.equal(a(t), b(t))


@pytest.mark.parametrize("name", TINY)
def test_block_attention(tiny_models, name):
    """Blocking the last query's view of the middle tokens changes the output, leaves every other position's
    residual stream untouched (causality), and blocking nothing changes nothing."""
    m = tiny_models[name]
    toks = m.to_tokens("The capital of France is")
    n = toks.shape[1]
    base = m.last_logits(toks)
    block = torch.zeros(1, n, n, dtype=torch.bool)
    with m.block_attention(range(m.cfg.n_layers), block):  # blocking nothing changes nothing
        assert torch.allclose(m.last_logits(toks), base, atol=1e-5)
    block[0, -1, 1:-1] = True  # last token may see only BOS and itself
    with m.block_attention(range(m.cfg.n_layers), block):
        blocked = m.last_logits(toks)
    assert not torch.allclose(blocked, base, atol=1e-4)
    # oracle: other positions are untouched, so their residuals equal the unblocked run's
    _, c0 = m.run_with_cache(toks, names=["blocks.1.hook_resid_post"])
    with m.block_attention(range(m.cfg.n_layers), block):
        _, c1 = m.run_with_cache(toks, names=["blocks.1.hook_resid_post"])
    assert torch.allclose(c0["blocks.1.hook_resid_post"][:, :-1], c1["blocks.1.hook_resid_post"][:, :-1], atol=1e-5)


def test_transformer_lens_style_hook_reads_hook_name(tiny_models):
    """``fn(act, hook)`` with ``hook.name`` (TransformerLens's HookPoint signature) works, and gives the same
    intervention as the string form ``fn(act, name)``."""
    m = tiny_models["tiny-gemma3"]
    toks = m.to_tokens(PROMPTS[0])
    names = ["blocks.1.hook_mlp_out", "blocks.2.attn.hook_z"]
    seen = []

    def tl_ablate(act, hook):
        seen.append(hook.name)
        assert type(hook.name) is str
        return torch.zeros_like(act) if hook.name.endswith("hook_mlp_out") else None

    def str_ablate(act, name):
        return torch.zeros_like(act) if name.endswith("hook_mlp_out") else None

    with m.hooks([(n, tl_ablate) for n in names]):
        tl = m.last_logits(toks)
    with m.hooks([(n, str_ablate) for n in names]):
        old = m.last_logits(toks)
    assert seen == names
    assert torch.equal(tl, old)
    assert not torch.allclose(tl, m.last_logits(toks), atol=1e-4)


def test_hook_argument_is_still_the_name_string(tiny_models):
    """Old code that treats the second argument as the hook-name string keeps working, and caches use plain
    string keys."""
    m = tiny_models["tiny-gemma3"]
    toks = m.to_tokens(PROMPTS[1])
    got = {}

    def grab(act, name):
        assert isinstance(name, str) and name == "blocks.0.hook_resid_post" and name.name == name
        got[name] = act
    with m.hooks([("blocks.0.hook_resid_post", grab)]):
        m.last_logits(toks)
    assert list(got) == ["blocks.0.hook_resid_post"] and f"{list(got)[0]}" == "blocks.0.hook_resid_post"
    _, cache = m.run_with_cache(toks, names=["blocks.0.hook_resid_post"])
    assert [type(k) for k in cache] == [str]
    assert torch.equal(cache["blocks.0.hook_resid_post"], got["blocks.0.hook_resid_post"])


def test_folder_that_does_not_load_raises_model_load_error(tmp_path):
    """A local folder that is not a loadable causal LM (here: a damaged weights file, which safetensors reports
    with its own exception type) gives a ModelLoadError that says what the folder needs."""
    from circuit_discovery.models.loading import build_tiny

    model, tok = build_tiny("tiny-gemma3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not load a causal LM from folder .*save_pretrained"):
        load_model(str(tmp_path), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="could not load a causal LM from folder"):
        load_model(str(empty), device="cpu")


def test_damaged_builtin_cache_is_rebuilt_once_then_reported(monkeypatch, tmp_path):
    from safetensors import SafetensorError

    from circuit_discovery.models import loading

    tiny = loading.build_tiny("tiny-gemma3")
    monkeypatch.setattr(loading, "builtin_folder", lambda name, cache_dir=None, **kw: tmp_path / name)
    failures = [SafetensorError("Error while deserializing header"), OSError("truncated")]

    def load_folder(folder, dt):
        if failures:
            raise failures.pop(0)
        return tiny
    monkeypatch.setattr(loading, "_load_folder", load_folder)
    with pytest.raises(ModelLoadError, match="rebuilt cache of 'gemma-3-270m'.*does not load either"):
        loading.load_model("gemma-3-270m", device="cpu", cache_dir=tmp_path)
    failures[:] = [SafetensorError("Error while deserializing header")]  # fails once: the rebuild loads
    assert loading.load_model("gemma-3-270m", device="cpu", cache_dir=tmp_path).cfg.n_layers == 4


@pytest.mark.parametrize("name", TINY)
def test_pre_gain_normalized_and_mlp_input(tiny_models, name):
    """ln2.hook_normalized is the pre-gain normalised MLP-norm input (unit RMS / zero-mean unit-variance); mlp.hook_in
    is the norm's output. Editing the pre-gain value reaches the MLP through the gain: zeroing it at one position
    makes mlp.hook_in there equal the norm's bias (zero for RMSNorm), and changes the logits (the hook is live)."""
    m = tiny_models[name]
    toks = m.to_tokens("The capital of France is")
    _, c = m.run_with_cache(toks, names=["blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_in"])
    xn, xin = c["blocks.1.ln2.hook_normalized"], c["blocks.1.mlp.hook_in"]
    x = c["blocks.1.hook_mlp_in"].float()
    if "gpt2" in name:
        x = x - x.mean(-1, keepdim=True)
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(xn.float(), x / rms, rtol=1e-3, atol=1e-3)  # independent closed form (eps ~ 1e-6)
    assert not torch.allclose(xn, xin, atol=1e-3)  # the gain is not the identity in these models
    with torch.no_grad():
        base = m(toks)
    seen = {}

    def zero(act, hook):
        act = act.clone()
        act[:, 2] = 0.0
        return act

    def keep(act, hook):
        seen["in"] = act.detach().clone()

    with torch.no_grad(), m.hooks([("blocks.1.ln2.hook_normalized", zero), ("blocks.1.mlp.hook_in", keep)]):
        out = m(toks)
    bias = getattr(m._layers[1], "ln_2", None)
    expect = torch.zeros_like(seen["in"][0, 2]) if bias is None or bias.bias is None else bias.bias.detach()
    torch.testing.assert_close(seen["in"][0, 2], expect.to(seen["in"].dtype), rtol=0, atol=1e-6)
    torch.testing.assert_close(seen["in"][0, 3], xin[0, 3], rtol=1e-5, atol=1e-5)  # other positions untouched
    assert (out - base).abs().max() > 1e-4
