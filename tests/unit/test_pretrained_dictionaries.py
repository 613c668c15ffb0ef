"""load_dictionary: SAELens folders and Gemma Scope params.npz against formulas written out here (no model)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    PretrainedDictionary,
    SAEConfig,
    create_sae,
    load_dictionary,
    save_sae,
)

D_IN, D_SAE, D_OUT, K = 6, 16, 5, 3
TOL = dict(atol=1e-6, rtol=1e-6)


def _weights(seed: int = 0, d_out: int = D_IN, jumprelu: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, d_out, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
        "b_dec": torch.randn(d_out, generator=g) * 0.3,
    }
    if jumprelu:
        w["threshold"] = torch.rand(D_SAE, generator=g) * 0.8 + 0.05
    return w


def _x(seed: int = 1, d: int = D_IN) -> torch.Tensor:
    return torch.randn(4, 7, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ oracles (plain torch, independent)
def _pre(w, x, apply_b_dec):
    return ((x - w["b_dec"]) if apply_b_dec else x) @ w["W_enc"] + w["b_enc"]


def _relu_enc(w, x, apply_b_dec):
    return torch.relu(_pre(w, x, apply_b_dec))


def _jumprelu_enc(w, x, apply_b_dec):
    pre = _pre(w, x, apply_b_dec)
    return (pre > w["threshold"]) * pre


def _topk_enc(w, x, apply_b_dec, k=K, rescale=False):
    pre = _pre(w, x, apply_b_dec)
    if rescale:
        pre = pre * w["W_dec"].norm(dim=-1)
    out = torch.zeros_like(pre)
    for idx in np.ndindex(*pre.shape[:-1]):
        row = pre[idx]
        keep = torch.argsort(row, descending=True)[:k]
        out[idx][keep] = torch.relu(row[keep])
    return out


def _dec(w, f, rescale=False):
    if rescale:
        f = f / w["W_dec"].norm(dim=-1)
    return f @ w["W_dec"] + w["b_dec"]


def _write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _v6(arch: str, hook: str = "blocks.2.hook_resid_post", **extra) -> dict:
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gemma-3-270m", "hook_name": hook, "sae_lens_version": "6.18.0"}}
    cfg.update(extra)
    return cfg


def _check(d, w, x, enc, rescale=False, skip=None):
    f = d.encode(x)
    torch.testing.assert_close(f, enc, **TOL)
    recon = _dec(w, enc, rescale)
    torch.testing.assert_close(d.decode(f), recon, **TOL)
    out = d(x)
    torch.testing.assert_close(out.feats, enc, **TOL)
    torch.testing.assert_close(out.recon, recon if skip is None else recon + x @ skip.T, **TOL)


# ------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    w = _weights(0)
    d = load_dictionary(_write_saelens(tmp_path / "s", _v6("standard", apply_b_dec_to_input=apply_b_dec), w))
    assert isinstance(d, PretrainedDictionary)
    assert (d.d_in, d.d_sae, d.architecture, d.skip) == (D_IN, D_SAE, "standard", None)
    assert d.hook_in == d.hook_out == "blocks.2.hook_resid_post"
    x = _x()
    _check(d, w, x, _relu_enc(w, x, apply_b_dec))


def test_saelens_jumprelu(tmp_path):
    w = _weights(1, jumprelu=True)
    d = load_dictionary(_write_saelens(tmp_path / "j", _v6("jumprelu", apply_b_dec_to_input=False), w))
    x = _x()
    enc = _jumprelu_enc(w, x, False)
    assert 0 < int((enc > 0).sum()) < enc.numel()  # the threshold matters
    assert d.architecture == "jumprelu"
    _check(d, w, x, enc)


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk(tmp_path, rescale):
    w = _weights(2)
    cfg = _v6("topk", k=K, rescale_acts_by_decoder_norm=rescale)
    d = load_dictionary(_write_saelens(tmp_path / "t", cfg, w))
    x = _x()
    enc = _topk_enc(w, x, True, rescale=rescale)
    assert int((d.encode(x) != 0).sum(-1).max()) <= K
    _check(d, w, x, enc, rescale=rescale)
    if rescale:  # really different from the plain computation
        assert not torch.allclose(enc, _topk_enc(w, x, True, rescale=False))


def test_saelens_transcoders(tmp_path):
    x = _x()
    # plain ReLU transcoder: b_dec is never subtracted (SAELens Transcoder), even if the cfg says true
    w = _weights(3, d_out=D_OUT)
    cfg = _v6("transcoder", hook="blocks.1.mlp.hook_in", d_out=D_OUT, hook_name_out="blocks.1.hook_mlp_out")
    d = load_dictionary(_write_saelens(tmp_path / "tc", cfg, w))
    assert (d.hook_in, d.hook_out, d.transcoder) == ("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", True)
    _check(d, w, x, _relu_enc(w, x, False))
    # jumprelu transcoder
    wj = _weights(4, d_out=D_OUT, jumprelu=True)
    cfg = _v6("jumprelu_transcoder", hook="blocks.1.hook_resid_mid", d_out=D_OUT,
              metadata={"hook_name": "blocks.1.hook_resid_mid", "hook_name_out": "blocks.1.hook_mlp_out"})
    d = load_dictionary(_write_saelens(tmp_path / "jtc", cfg, wj))
    assert (d.hook_in, d.hook_out) == ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")
    _check(d, wj, x, _jumprelu_enc(wj, x, False))
    # skip transcoder: W_skip [d_out, d_in], recon += x @ W_skip.T
    ws = _weights(5, d_out=D_OUT)
    ws["W_skip"] = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(9))
    cfg = _v6("skip_transcoder", hook="blocks.1.hook_resid_mid", d_out=D_OUT, hook_name_out="blocks.1.hook_mlp_out")
    d = load_dictionary(_write_saelens(tmp_path / "stc", cfg, ws))
    assert d.skip is not None and tuple(d.skip.shape) == (D_IN, D_OUT)
    _check(d, ws, x, _relu_enc(ws, x, False), skip=ws["W_skip"])


def test_saelens_pre6_config(tmp_path):
    w = _weights(6)
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32",
           "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3, "hook_point_head_index": None,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False,
           "apply_b_dec_to_input": True, "model_name": "gpt2"}
    d = load_dictionary(_write_saelens(tmp_path / "p", cfg, w))
    assert (d.architecture, d.hook_in) == ("topk", "blocks.3.hook_resid_pre")
    x = _x()
    _check(d, w, x, _topk_enc(w, x, True))


def test_saelens_expected_average_only_in_is_folded(tmp_path):
    w, s = _weights(7), 2.5
    cfg = _v6("standard", normalize_activations="expected_average_only_in", norm_scaling_factor=s)
    d = load_dictionary(_write_saelens(tmp_path / "n", cfg, w))
    x = _x()
    enc = _relu_enc(w, x * s, True)  # the SAE was trained on x * s; its output is divided by s
    fold_tol = dict(atol=1e-5, rtol=1e-5)  # the folded weights round differently in float32
    torch.testing.assert_close(d.encode(x), enc, **fold_tol)
    torch.testing.assert_close(d(x).recon, _dec(w, enc) / s, **fold_tol)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_round_trip_with_our_writer(tmp_path, arch):
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K,
                               metadata={"hook_name": "blocks.4.hook_resid_post"}), seed=3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    sae.eval()
    d = load_dictionary(save_sae(sae, tmp_path / arch))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x), sae.encode(x), atol=0, rtol=0)
        torch.testing.assert_close(d.decode(d.encode(x)), sae.decode(sae.encode(x)), atol=0, rtol=0)
    assert d.hook_in == d.hook_out == "blocks.4.hook_resid_post"


def test_round_trip_our_transcoder(tmp_path):
    sae = create_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=K, d_out=D_OUT, transcoder=True,
                               metadata={"hook_name": "blocks.0.ln2.hook_normalized",
                                         "hook_name_out": "blocks.0.hook_mlp_out"}), seed=4)
    sae.eval()
    d = load_dictionary(save_sae(sae, tmp_path / "tc") / "cfg.json")  # the cfg.json path works too
    assert (d.hook_in, d.hook_out, d.transcoder) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", True)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(d(x).recon, sae.decode(sae.encode(x)), atol=0, rtol=0)


# ------------------------------------------------------------------ Gemma Scope 1
def test_gemma_scope_npz(tmp_path):
    w = _weights(8, jumprelu=True)
    folder = tmp_path / "models--google--gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    x = _x()
    for src in (folder, folder / "params.npz"):
        d = load_dictionary(src, dtype="float64")
        assert d.W_enc.dtype == torch.float64
        assert (d.architecture, d.hook_in, d.hook_out, d.source_format) == (
            "jumprelu", "blocks.5.hook_resid_post", "blocks.5.hook_resid_post", "gemma_scope_1")
        enc = _jumprelu_enc({k: v.double() for k, v in w.items()}, x.double(), False)
        torch.testing.assert_close(d.encode(x.double()), enc, **TOL)
    plain = tmp_path / "p.npz"
    np.savez(plain, **{k: v.numpy() for k, v in w.items()})
    d = load_dictionary(plain)
    assert d.hook_in is None and d.hook_out is None and d.W_enc.dtype == torch.float32
    _check(d, w, x, _jumprelu_enc(w, x, False))


# ------------------------------------------------------------------ typed errors
@pytest.mark.parametrize(("field", "value", "extra"), [
    ("architecture", "matching_pursuit", {}),
    ("normalize_activations", "layer_norm", {}),
    ("normalize_activations", "expected_average_only_in", {}),  # no dataset-level factor in the files
    ("reshape_activations", "hook_z", {}),
    ("hook_head_index", 3, {}),
    ("rescale_acts_by_decoder_norm", True, {}),  # only defined for topk
    ("activation_fn", "tanh-relu", {}),
    ("finetuning_scaling_factor", True, {}),
    ("k", None, {"architecture": "topk"}),
])
def test_unsupported_field_values(tmp_path, field, value, extra):
    cfg = {**_v6("standard"), **extra}
    if field in ("hook_head_index",):
        cfg["metadata"][field] = value
    else:
        cfg[field] = value
    folder = _write_saelens(tmp_path / "e", cfg, _weights(0))
    with pytest.raises(DictionaryFormatError) as ei:
        load_dictionary(folder)
    assert isinstance(ei.value, CircuitDiscoveryError)
    assert field in str(ei.value) and (value is None or str(value) in str(ei.value) or repr(value) in str(ei.value))


@pytest.mark.parametrize("hook", ["blocks.2.attn.hook_z", "blocks.2.hook_q", "blocks.2.ln1.hook_normalized",
                                  "unembed.hook_out"])
def test_unmappable_hook(tmp_path, hook):
    folder = _write_saelens(tmp_path / "h", _v6("standard", hook=hook), _weights(0))
    with pytest.raises(DictionaryFormatError, match="hook_name"):
        load_dictionary(folder)


def test_gemma_scope_transcoder_and_attention_hooks(tmp_path):
    """Gemma Scope 1 transcoders read TransformerLens's ln2.hook_normalized (before the gain) and write
    hook_mlp_out; attention SAEs read attn.hook_z flattened over heads; embedding SAEs read hook_embed."""
    w = _weights(8, jumprelu=True)
    for repo, sub, hooks, reshape in (
            ("gemma-scope-2b-pt-transcoders", "layer_1", ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"),
             "none"),
            ("gemma-scope-2b-pt-att", "layer_1", ("blocks.1.attn.hook_z", "blocks.1.attn.hook_z"), "hook_z"),
            ("gemma-scope-2b-pt-res", "embedding", ("hook_embed", "hook_embed"), "none")):
        folder = tmp_path / repo / sub / "width_16k" / "average_l0_9"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
        d = load_dictionary(folder)
        assert (d.hook_in, d.hook_out, d.reshape_activations) == (*hooks, reshape)
        assert d.transcoder == (repo.endswith("transcoders"))
    x = _x()
    _check(d, w, x, _jumprelu_enc(w, x, False))


def test_file_errors(tmp_path):
    w = _weights(0)
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    (only_cfg / "cfg.json").write_text(json.dumps(_v6("standard")))
    with pytest.raises(DictionaryNotFoundError, match="sae_weights.safetensors"):
        load_dictionary(only_cfg)
    with pytest.raises(DictionaryNotFoundError):
        load_dictionary(tmp_path / "does_not_exist")
    with pytest.raises(DictionaryNotFoundError):
        load_dictionary(tmp_path)  # a folder with no dictionary in it
    # shape mismatch, extra tensor, missing threshold
    with pytest.raises(DictionaryFormatError, match="shape"):
        load_dictionary(_write_saelens(tmp_path / "shape", _v6("standard", d_sae=D_SAE + 1), w))
    with pytest.raises(DictionaryFormatError, match="does not use"):
        load_dictionary(_write_saelens(tmp_path / "extra", _v6("standard"), {**w, "b_mag": w["b_enc"].clone()}))
    with pytest.raises(DictionaryFormatError, match="threshold"):
        load_dictionary(_write_saelens(tmp_path / "nothr", _v6("jumprelu"), w))
    # not-yet-supported formats say so
    sp = tmp_path / "sparsify"
    sp.mkdir()
    (sp / "cfg.json").write_text("{}")
    save_file(w, str(sp / "sae.safetensors"))
    with pytest.raises(DictionaryFormatError, match="d_in"):
        load_dictionary(sp)
    ct = tmp_path / "ct"
    ct.mkdir()
    (ct / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(DictionaryFormatError, match="load_transcoder_set"):
        load_dictionary(ct)


def test_pickled_npz_refused(tmp_path):
    w = {k: v.numpy() for k, v in _weights(8, jumprelu=True).items()}
    path = tmp_path / "params.npz"
    np.savez(path, **w, evil=np.array([{"a": 1}], dtype=object))  # object array: stored with pickle
    with pytest.raises(DictionaryFormatError, match="pickle"):
        load_dictionary(path)
    np.savez(path, **w, scaling_factor=np.float32(2.0))
    with pytest.raises(DictionaryFormatError, match="scaling_factor"):
        load_dictionary(path)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_not_cached(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(DictionaryNotFoundError, match="not in the local Hugging Face cache"):
        load_dictionary("circuit-discovery-tests/not-a-real-dictionary/layer_0")


def test_hub_id_from_local_cache(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / "models--google--gemma-scope-2b-pt-res"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit / "layer_7" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    w = _weights(10, jumprelu=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    d = load_dictionary("google/gemma-scope-2b-pt-res/layer_7/width_16k/average_l0_20")
    assert d.hook_in == "blocks.7.hook_resid_post"
    x = _x()
    _check(d, w, x, _jumprelu_enc(w, x, False))
    with pytest.raises(DictionaryNotFoundError, match="not in the local Hugging Face cache"):
        load_dictionary("google/gemma-scope-2b-pt-res/layer_8/width_16k/average_l0_20")
