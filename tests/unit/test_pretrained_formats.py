"""load_dictionary on every published format: files written here in each format's documented layout, loaded, and
compared with the format's computation written out independently in numpy (tolerance 1e-6 in float64);
hook-name mapping checked against the tiny models' own modules; bad input gives one-line typed errors and writes
nothing."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae.pretrained import (
    DictionaryFormatError,
    DictionaryNotFoundError,
    load_dictionary,
    map_hf_hook,
    map_hook_name,
)

D, N, K = 6, 16, 3
TOL = dict(atol=1e-6, rtol=1e-6)
RNG = np.random.default_rng


# ------------------------------------------------------------------ numpy oracles (each format's own formula)
def relu(a):
    return np.maximum(a, 0.0)


def topk_keep(pre, k, apply_relu):
    """The k largest entries per row kept (ReLU'd if ``apply_relu``), the rest zero."""
    out = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=-1)[..., :k]
    vals = np.take_along_axis(pre, idx, -1)
    np.put_along_axis(out, idx, relu(vals) if apply_relu else vals, -1)
    return out


def f32(*shape, seed, scale=1.0):
    return (RNG(seed).standard_normal(shape) * scale).astype(np.float32)


def x64(*shape, seed=99):
    return RNG(seed).standard_normal(shape)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def check(d, x, feats, recon, *, recon_fwd=None):
    """``d.encode``/``d.decode``/``d.forward`` (in float64) against the oracle's features and reconstruction."""
    xt = t(x)
    f = d.encode(xt)
    torch.testing.assert_close(f, t(feats), **TOL)
    torch.testing.assert_close(d.decode(f), t(recon), **TOL)
    out = d(xt)
    torch.testing.assert_close(out.feats, t(feats), **TOL)
    torch.testing.assert_close(out.recon, t(recon if recon_fwd is None else recon_fwd), **TOL)


def tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


# ------------------------------------------------------------------ SAELens: gated, hook_z, head index, skip
def _saelens(folder: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: t(v) for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _cfg(arch, hook, d_in=D, **extra):
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": N, "dtype": "float32", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2-small", "hook_name": hook, "hook_head_index": None}}
    cfg.update(extra)
    return cfg


def test_saelens_gated(tmp_path):
    w = {"W_enc": f32(D, N, seed=1), "b_gate": f32(N, seed=2, scale=0.5), "r_mag": f32(N, seed=3, scale=0.3),
         "b_mag": f32(N, seed=4, scale=0.5), "W_dec": f32(N, D, seed=5), "b_dec": f32(D, seed=6, scale=0.3)}
    d = load_dictionary(_saelens(tmp_path / "g", _cfg("gated", "blocks.1.hook_resid_post"), w), dtype="float64")
    x = x64(3, 5, D)
    W = {k: v.astype(np.float64) for k, v in w.items()}
    s = x - W["b_dec"]  # SAELens GatedSAE.encode
    gate = (s @ W["W_enc"] + W["b_gate"]) > 0
    feats = gate * relu(s @ (W["W_enc"] * np.exp(W["r_mag"])) + W["b_mag"])
    assert 0 < gate.mean() < 1 and (feats > 0).mean() < gate.mean() + 1e-9  # the gate and the magnitude matter
    assert d.architecture == "gated" and d.hook_in == "blocks.1.hook_resid_post"
    check(d, x, feats, feats @ W["W_dec"] + W["b_dec"])


def test_saelens_hook_z_reshape_and_head_index(tmp_path):
    H, Dh = 2, 3  # d_in = H * Dh = D
    w = {"W_enc": f32(D, N, seed=7), "b_enc": f32(N, seed=8, scale=0.3), "W_dec": f32(N, D, seed=9),
         "b_dec": f32(D, seed=10, scale=0.3), "threshold": np.abs(f32(N, seed=11, scale=0.5))}
    cfg = _cfg("jumprelu", "blocks.2.attn.hook_z", apply_b_dec_to_input=False, reshape_activations="hook_z")
    d = load_dictionary(_saelens(tmp_path / "z", cfg, w), dtype="float64")
    assert (d.hook_in, d.reshape_activations) == ("blocks.2.attn.hook_z", "hook_z")
    z = x64(2, 4, H, Dh)  # HookedModel's attn.hook_z: [batch, pos, head, d_head]
    W = {k: v.astype(np.float64) for k, v in w.items()}
    flat = z.reshape(2, 4, D)
    pre = flat @ W["W_enc"] + W["b_enc"]
    feats = relu(pre) * (pre > W["threshold"])
    recon = feats @ W["W_dec"] + W["b_dec"]
    torch.testing.assert_close(d.encode(t(z)), t(feats), **TOL)
    out = d(t(z))
    assert out.recon.shape == z.shape  # forward gives the reconstruction back per head
    torch.testing.assert_close(out.recon, t(recon.reshape(z.shape)), **TOL)
    # one head: d_in = d_head, select_input picks it from hook_z
    wh = {"W_enc": f32(Dh, N, seed=12), "b_enc": f32(N, seed=13), "W_dec": f32(N, Dh, seed=14),
          "b_dec": f32(Dh, seed=15)}
    cfg = _cfg("standard", "blocks.2.attn.hook_z", d_in=Dh)
    cfg["metadata"]["hook_head_index"] = 1
    dh = load_dictionary(_saelens(tmp_path / "h", cfg, wh), dtype="float64")
    assert dh.hook_head_index == 1
    Wh = {k: v.astype(np.float64) for k, v in wh.items()}
    feats = relu((z[..., 1, :] - Wh["b_dec"]) @ Wh["W_enc"] + Wh["b_enc"])
    torch.testing.assert_close(dh.encode(dh.select_input(t(z))), t(feats), **TOL)


def test_saelens_jumprelu_skip_transcoder(tmp_path):
    w = {"W_enc": f32(D, N, seed=16), "b_enc": f32(N, seed=17, scale=0.3), "W_dec": f32(N, 4, seed=18),
         "b_dec": f32(4, seed=19), "threshold": np.abs(f32(N, seed=20, scale=0.5)), "W_skip": f32(4, D, seed=21)}
    cfg = _cfg("jumprelu_skip_transcoder", "blocks.0.mlp.hook_in", d_out=4, apply_b_dec_to_input=False)
    cfg["metadata"]["hook_name_out"] = "blocks.0.hook_mlp_out"
    d = load_dictionary(_saelens(tmp_path / "s", cfg, w), dtype="float64")
    W = {k: v.astype(np.float64) for k, v in w.items()}
    x = x64(5, D)
    pre = x @ W["W_enc"] + W["b_enc"]
    feats = relu(pre) * (pre > W["threshold"])
    recon = feats @ W["W_dec"] + W["b_dec"]
    assert (d.hook_in, d.hook_out, d.transcoder) == ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", True)
    check(d, x, feats, recon, recon_fwd=recon + x @ W["W_skip"].T)  # SAELens SkipTranscoder: x @ W_skip.T


def test_saelens_prefers_the_recorded_hugging_face_module(tmp_path):
    """SAELens's Gemma Scope 2 converter records the module it reads (``hf_hook_name``) beside a TransformerLens
    name; the module path is exact (the pre-MLP norm's output, after the gain: mlp.hook_in) and wins."""
    w = {"W_enc": f32(D, N, seed=22), "b_enc": f32(N, seed=23), "W_dec": f32(N, D, seed=24), "b_dec": f32(D, seed=25),
         "threshold": np.abs(f32(N, seed=26))}
    cfg = _cfg("jumprelu_transcoder", "blocks.4.ln2.hook_normalized", d_out=D, apply_b_dec_to_input=False)
    cfg["metadata"].update(model_name="google/gemma-3-1b-pt", hook_name_out="blocks.4.hook_mlp_out",
                           hf_hook_name="model.layers.4.pre_feedforward_layernorm.output",
                           hf_hook_name_out="model.layers.4.post_feedforward_layernorm.output")
    d = load_dictionary(_saelens(tmp_path / "gs2", cfg, w))
    assert (d.hook_in, d.hook_out) == ("blocks.4.mlp.hook_in", "blocks.4.hook_mlp_out")
    del cfg["metadata"]["hf_hook_name"], cfg["metadata"]["hf_hook_name_out"]
    d = load_dictionary(_saelens(tmp_path / "tl", cfg, w))
    assert (d.hook_in, d.hook_out) == ("blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out")


def test_hub_ids():
    from circuit_discovery.sae.pretrained_formats import parse_hub_id

    assert parse_hub_id("google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine") == (
        "google/gemma-scope-2-270m-pt", "clt/width_262k_l0_medium_affine", None)
    assert parse_hub_id("hf://google/gemma-scope-2b-pt-transcoders/layer_0/params.npz?revision=abc") == (
        "google/gemma-scope-2b-pt-transcoders", "layer_0/params.npz", "abc")
    assert parse_hub_id("mntss/gemma-scope-transcoders@v2") == ("mntss/gemma-scope-transcoders", "", "v2")
    assert parse_hub_id("not a hub id") is None


# ------------------------------------------------------------------ Gemma Scope 2
def _gs2(folder: Path, tensors: dict[str, np.ndarray], cfg: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: t(v) for k, v in tensors.items()}, str(folder / "params.safetensors"))
    return folder


def _gs2_weights(seed, d_in=D, d_out=D, affine=False):
    w = {"w_enc": f32(d_in, N, seed=seed), "w_dec": f32(N, d_out, seed=seed + 1), "b_enc": f32(N, seed=seed + 2),
         "b_dec": f32(d_out, seed=seed + 3), "threshold": np.abs(f32(N, seed=seed + 4, scale=0.6))}
    if affine:
        w["affine_skip_connection"] = f32(d_in, d_out, seed=seed + 5, scale=0.3)
    return w


def _gs2_oracle(w, x):
    W = {k: v.astype(np.float64) for k, v in w.items()}
    pre = x @ W["w_enc"] + W["b_enc"]
    feats = (pre > W["threshold"]) * relu(pre)  # Gemma Scope 2's JumpReLUSAE.encode
    recon = feats @ W["w_dec"] + W["b_dec"]
    skip = x @ W["affine_skip_connection"] if "affine_skip_connection" in W else 0.0
    return feats, recon, recon + skip


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoder(tmp_path, affine):
    name = f"layer_3_width_16k_l0_small{'_affine' if affine else ''}"
    cfg = {"hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
           "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output", "width": N,
           "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 7,
           "affine_connection": affine, "type": "transcoder"}
    w = _gs2_weights(30, affine=affine)
    folder = _gs2(tmp_path / "transcoder_all" / name, w, cfg)
    d = load_dictionary(folder, dtype="float64")
    assert (d.hook_in, d.hook_out, d.transcoder, d.source_format) == (
        "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out", True, "gemma_scope_2")
    assert (d.skip is not None) == affine
    x = x64(4, D)
    feats, recon, fwd = _gs2_oracle(w, x)
    check(d, x, feats, recon, recon_fwd=fwd)
    # the file alone, without config.json: hooks inferred from the published folder name
    (folder / "config.json").unlink()
    d2 = load_dictionary(folder / "params.safetensors")
    assert (d2.hook_in, d2.hook_out, d2.W_enc.dtype) == ("blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out",
                                                          torch.float32)


def test_gemma_scope_2_saes(tmp_path):
    for site, point, hook in (("resid_post", "model.layers.5.output", "blocks.5.hook_resid_post"),
                              ("attn_out", "model.layers.5.self_attn.o_proj.input", "blocks.5.attn.hook_z"),
                              ("mlp_out", "model.layers.5.post_feedforward_layernorm.output",
                               "blocks.5.hook_mlp_out")):
        cfg = {"hf_hook_point_in": point, "hf_hook_point_out": point, "width": N,
               "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu", "l0": 20,
               "affine_connection": False, "type": "sae"}
        w = _gs2_weights(40)
        d = load_dictionary(_gs2(tmp_path / site / "layer_5_width_16k_l0_small", w, cfg), dtype="float64")
        assert (d.hook_in, d.hook_out, d.transcoder) == (hook, hook, False)
        assert d.reshape_activations == ("hook_z" if site == "attn_out" else "none")
        x = x64(3, D)
        feats, recon, _ = _gs2_oracle(w, x)
        check(d, x, feats, recon)


# ------------------------------------------------------------------ circuit-tracer per-layer files
def _ct_oracle(w, x, activation, k=None):
    W = {key: v.astype(np.float64) for key, v in w.items()}
    pre = x @ W["W_enc"].T + W["b_enc"]  # F.linear(x, W_enc [d_sae, d_model], b_enc)
    if activation == "relu":
        feats = relu(pre)
    elif activation == "jumprelu":
        feats = pre * (pre > W["activation_function.threshold"])  # circuit-tracer's jumprelu: no ReLU
    else:
        feats = topk_keep(pre, k, apply_relu=False)  # circuit-tracer's TopK: x * gate, no ReLU
    recon = feats @ W["W_dec"] + W["b_dec"]
    skip = x @ W["W_skip"].T if "W_skip" in W else 0.0
    return feats, recon, recon + skip


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "jumprelu_negative", "topk"])
def test_circuit_tracer_layer_file(tmp_path, activation):
    w = {"W_enc": f32(N, D, seed=50), "W_dec": f32(N, D, seed=51), "b_enc": f32(N, seed=52),
         "b_dec": f32(D, seed=53), "W_skip": f32(D, D, seed=54, scale=0.3)}
    tensors = {k: t(v) for k, v in w.items()}
    if activation.startswith("jumprelu"):
        thr = np.abs(f32(N, seed=55, scale=0.5))
        if activation == "jumprelu_negative":
            thr = thr - 0.6  # some thresholds below zero: pre * (pre > threshold) lets negatives through
        w["activation_function.threshold"] = thr
        tensors["activation_function.threshold"] = t(thr)
    if activation == "topk":
        tensors["k"] = torch.tensor(K)
        w["b_enc"] = w["b_enc"] - 4.0  # some of the k largest are negative: kept as they are
        tensors["b_enc"] = t(w["b_enc"])
    save_file(tensors, str(tmp_path / "layer_2.safetensors"))
    d = load_dictionary(tmp_path / "layer_2.safetensors", dtype="float64")
    x = x64(4, 7, D)
    feats, recon, fwd = _ct_oracle(w, x, activation.split("_")[0], K)
    if activation == "jumprelu_negative":
        assert (feats < 0).any()  # the no-ReLU form really differs here
        assert d.architecture == "jumprelu_no_relu"
    if activation == "topk":
        assert d.architecture == "topk_no_relu" and (feats < 0).any()
    check(d, x, feats, recon, recon_fwd=fwd)


# ------------------------------------------------------------------ sparsify
def _sparsify(folder: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: t(v) for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder


def _sp_cfg(**extra):
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": N, "k": K,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    cfg.update(extra)
    return cfg


def _sp_oracle(w, x, transcode):
    W = {k: v.astype(np.float64) for k, v in w.items()}
    s = x if transcode else x - W["b_dec"]  # SparseCoder.encode subtracts b_dec only when autoencoding
    pre = relu(s @ W["encoder.weight"].T + W["encoder.bias"])  # fused_encoder: relu(linear), then top-k
    feats = topk_keep(pre, K, apply_relu=True)
    recon = feats @ W["W_dec"] + W["b_dec"]
    skip = x @ W["W_skip"].T if "W_skip" in W else 0.0
    return feats, recon, recon + skip


def test_sparsify_sae_and_transcoder(tmp_path):
    w = {"encoder.weight": f32(N, D, seed=60), "encoder.bias": f32(N, seed=61), "W_dec": f32(N, D, seed=62),
         "b_dec": f32(D, seed=63)}
    run = tmp_path / "checkpoints" / "run"
    d = load_dictionary(_sparsify(run / "layers.4", _sp_cfg(), w), dtype="float64")
    assert (d.hook_in, d.hook_out, d.architecture, d.transcoder) == (
        "blocks.4.hook_resid_post", "blocks.4.hook_resid_post", "topk", False)
    x = x64(3, D)
    feats, recon, _ = _sp_oracle(w, x, False)
    check(d, x, feats, recon)
    # a transcoder on layers.4.mlp with a skip connection; the run's config.json names the model
    wt = {**w, "W_skip": f32(D, D, seed=64, scale=0.3)}
    (run / "config.json").write_text(json.dumps({"model": "meta-llama/Llama-3.2-1B", "batch_size": 8}))
    folder = _sparsify(run / "layers.4.mlp", _sp_cfg(transcode=True, skip_connection=True), wt)
    d = load_dictionary(folder, dtype="float64")
    assert (d.hook_in, d.hook_out, d.transcoder) == ("blocks.4.mlp.hook_in", "blocks.4.hook_mlp_out", True)
    feats, recon, fwd = _sp_oracle(wt, x, True)
    check(d, x, feats, recon, recon_fwd=fwd)


def test_sparsify_gemma_post_norm_caveat(tmp_path):
    """A sparsify transcoder on a Gemma 2/3 ``layers.N.mlp`` predicts the MLP's output before
    post_feedforward_layernorm, which no exact conversion turns into hook_mlp_out: a typed error naming it."""
    w = {"encoder.weight": f32(N, D, seed=65), "encoder.bias": f32(N, seed=66), "W_dec": f32(N, D, seed=67),
         "b_dec": f32(D, seed=68)}
    folder = _sparsify(tmp_path / "run" / "layers.2.mlp", _sp_cfg(transcode=True), w)
    with pytest.raises(DictionaryFormatError, match="model="):  # which model? the files do not say
        load_dictionary(folder)
    with pytest.raises(DictionaryFormatError, match="post_feedforward_layernorm") as ei:
        load_dictionary(folder, model="google/gemma-2-2b")
    assert "layers.2.mlp" in str(ei.value) and "\n" not in str(ei.value)
    d = load_dictionary(folder, model="Qwen/Qwen2.5-0.5B")  # no post-norm: the MLP's output joins the stream
    assert (d.hook_in, d.hook_out) == ("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out")
    # the post-norm's own output is hook_mlp_out in Gemma: a coder there loads
    d = load_dictionary(_sparsify(tmp_path / "run2" / "layers.2.post_feedforward_layernorm", _sp_cfg(), w),
                        model="gemma-3-270m")
    assert d.hook_in == d.hook_out == "blocks.2.hook_mlp_out"


# ------------------------------------------------------------------ dictionary_learning
def _dl(folder: Path, cls: str, sd: dict[str, torch.Tensor], **trainer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd, folder / "ae.pt")
    cfg = {"trainer": {"dict_class": cls, "activation_dim": D, "dict_size": N, "lm_name": "EleutherAI/pythia-70m",
                       "layer": 3, "submodule_name": "resid_post_layer_3", "lr": 1e-3, **trainer},
           "buffer": {"d_submodule": D}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_dictionary_learning_classes(tmp_path):
    x = x64(5, D)
    enc_w, enc_b, dec_w, bias = f32(N, D, seed=70), f32(N, seed=71), f32(D, N, seed=72), f32(D, seed=73)
    E, b, Dw, c = (a.astype(np.float64) for a in (enc_w, enc_b, dec_w, bias))
    cases = []
    # AutoEncoder: relu(encoder(x - bias)); decoder(f) + bias
    f = relu((x - c) @ E.T + b)
    cases.append(("AutoEncoder", {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                                  "bias": bias}, {}, f, f @ Dw.T + c))
    # AutoEncoderNew: relu(encoder(x)); decoder(f) (with bias)
    f = relu(x @ E.T + b)
    cases.append(("AutoEncoderNew", {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w,
                                     "decoder.bias": bias}, {}, f, f @ Dw.T + c))
    # GatedAutoEncoder
    r, gb, mb = f32(N, seed=74, scale=0.3), f32(N, seed=75), f32(N, seed=76)
    xe = (x - c) @ E.T
    f = ((xe + gb) > 0) * relu(np.exp(r.astype(np.float64)) * xe + mb)
    cases.append(("GatedAutoEncoder", {"encoder.weight": enc_w, "decoder.weight": dec_w, "decoder_bias": bias,
                                       "r_mag": r, "gate_bias": gb, "mag_bias": mb}, {}, f, f @ Dw.T + c))
    # JumpReluAutoEncoder: relu(pre * (pre > threshold)), no input centring
    thr = np.abs(f32(N, seed=77, scale=0.5))
    pre = x @ E.T.copy() + b
    f = relu(pre * (pre > thr))
    cases.append(("JumpReluAutoEncoder", {"W_enc": enc_w.T.copy(), "b_enc": enc_b, "W_dec": dec_w.T.copy(),
                                          "b_dec": bias, "threshold": thr}, {}, f, f @ Dw.T + c))
    # AutoEncoderTopK: relu(encoder(x - b_dec)) then the top k
    post = relu((x - c) @ E.T + b)
    f = topk_keep(post, K, apply_relu=True)
    topk_sd = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": bias,
               "k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(-1.0)}
    cases.append(("AutoEncoderTopK", topk_sd, {"k": K}, f, f @ Dw.T + c))
    # BatchTopKSAE at inference: relu(...) * (relu(...) > threshold); unset (negative) and set thresholds
    for th in (-1.0, 0.4):
        f = post * (post > th)
        cases.append(("BatchTopKSAE", {**topk_sd, "threshold": torch.tensor(th)}, {"k": K}, f, f @ Dw.T + c))
    f = post * (post > 0.4)
    cases.append(("MatryoshkaBatchTopKSAE", {"W_enc": enc_w.T.copy(), "b_enc": enc_b, "W_dec": dec_w.T.copy(),
                                             "b_dec": bias, "k": torch.tensor(K, dtype=torch.int),
                                             "threshold": torch.tensor(0.4),
                                             "group_sizes": torch.tensor([8, 8])}, {"k": K}, f, f @ Dw.T + c))
    for i, (cls, sd, trainer, feats, recon) in enumerate(cases):
        sdt = {k: (v if isinstance(v, torch.Tensor) else t(v)) for k, v in sd.items()}
        d = load_dictionary(_dl(tmp_path / f"trainer_{i}", cls, sdt, **trainer), dtype="float64")
        assert (d.hook_in, d.source_format) == ("blocks.3.hook_resid_post", "dictionary_learning"), cls
        check(d, x, feats, recon)


# ------------------------------------------------------------------ hook names against the models' own modules
@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma2", "tiny-llama", "tiny-gpt2"])
def test_hf_module_hooks_match_the_models_modules(name):
    """Every Hugging Face module path the loader maps is read, on a tiny model, at the module it names:
    the module's forward input/output equals ``run_with_cache`` of the mapped hook (exact)."""
    from circuit_discovery.models import load_model

    model = load_model(name, device="cpu")
    layer = 1
    mt = model.hf_model.config.model_type
    base = model.hf_model.transformer if mt == "gpt2" else model.hf_model.model
    block = base.h[layer] if mt == "gpt2" else base.layers[layer]
    prefix = "h" if mt == "gpt2" else "layers"
    subs = {"gpt2": ["ln_2", "mlp", "attn", "attn.c_proj", "mlp.c_proj", "ln_1"],
            "llama": ["post_attention_layernorm", "mlp", "self_attn", "self_attn.o_proj", "mlp.down_proj",
                      "input_layernorm"]}.get(mt, ["pre_feedforward_layernorm", "post_feedforward_layernorm",
                                                    "post_attention_layernorm", "mlp", "self_attn.o_proj",
                                                    "mlp.down_proj", "input_layernorm"])
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for sub in ["", *subs]:
        mod = block.get_submodule(sub) if sub else block

        def hook(m, args, output, sub=sub):
            seen[f"{sub}.input"] = args[0] if args else None
            seen[f"{sub}.output"] = output[0] if isinstance(output, tuple) else output

        handles.append(mod.register_forward_hook(hook))
    tokens = model.to_tokens(["The Eiffel Tower is in"])
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        for h in handles:
            h.remove()
    mapped = 0
    for key, value in seen.items():
        if value is None:
            continue
        sub, io = key.rsplit(".", 1)
        point = f"{prefix}.{layer}{'.' + sub if sub else ''}.{io}"
        try:
            hook = map_hf_hook(point, model=name)
        except DictionaryFormatError as e:  # only the post-norm caveat or an input/output with no hook here
            assert "post_" in str(e) or "no counterpart" in str(e), str(e)
            continue
        got = cache[hook]
        if hook.endswith("attn.hook_z"):
            got = got.flatten(-2)
        torch.testing.assert_close(got.float(), value.float(), atol=1e-5, rtol=1e-5, msg=f"{point} -> {hook}")
        mapped += 1
    assert mapped >= 6
    assert map_hf_hook(f"model.{prefix}.{layer}.output" if mt != "gpt2" else f"transformer.h.{layer}.output",
                       model=name) == f"blocks.{layer}.hook_resid_post"


def test_transformer_lens_names():
    for site in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                 "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_post", "hook_mlp_in", "attn.hook_z"):
        assert map_hook_name(f"blocks.7.{site}") == f"blocks.7.{site}"  # TL names mean the same here
    assert map_hook_name("blocks.7.ln2.hook_out") == "blocks.7.mlp.hook_in"  # TL bridge: after the gain
    assert map_hook_name("blocks.7.mlp.hook_out", model="meta-llama/Llama-3.2-1B") == "blocks.7.hook_mlp_out"
    assert map_hook_name("blocks.7.attn.hook_out", model="gpt2") == "blocks.7.hook_attn_out"
    for model in ("google/gemma-2-2b", "gemma-3-270m"):
        with pytest.raises(DictionaryFormatError, match="post_feedforward_layernorm"):
            map_hook_name("blocks.7.mlp.hook_out", model=model)
    with pytest.raises(DictionaryFormatError, match="model="):
        map_hook_name("blocks.7.mlp.hook_out")
    assert map_hook_name("blocks.7.mlp.hook_out", model="google/gemma-2b") == "blocks.7.hook_mlp_out"  # Gemma 1
    with pytest.raises(DictionaryFormatError, match="hook_q"):
        map_hook_name("blocks.7.attn.hook_q")


# ------------------------------------------------------------------ bad input
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_input_is_one_typed_line_and_writes_nothing(tmp_path):
    root = tmp_path / "inputs"
    # a folder in no known format
    (root / "unknown").mkdir(parents=True)
    (root / "unknown" / "weights.txt").write_text("1 2 3")
    # a missing key (Gemma Scope 2 without threshold), a wrong shape (sparsify), an unsupported field
    w = _gs2_weights(80)
    _gs2(root / "missing", {k: v for k, v in w.items() if k != "threshold"}, None)
    _sparsify(root / "shape" / "layers.1", _sp_cfg(num_latents=N + 1), {
        "encoder.weight": f32(N, D, seed=81), "encoder.bias": f32(N, seed=82), "W_dec": f32(N, D, seed=83),
        "b_dec": f32(D, seed=84)})
    _sparsify(root / "field" / "layers.1", {**_sp_cfg(), "signed": True}, {
        "encoder.weight": f32(N, D, seed=81), "encoder.bias": f32(N, seed=82), "W_dec": f32(N, D, seed=83),
        "b_dec": f32(D, seed=84)})
    _gs2(root / "gs2field", w, {"hf_hook_point_in": "model.layers.1.output", "width": N, "dtype": "bf16"})
    _gs2(root / "gs2arch", w, {"hf_hook_point_in": "model.layers.1.output", "architecture": "relu"})
    # pickles: a pickled object as ae.pt, a .pkl file, a folder of pickles
    (root / "pickled").mkdir()
    (root / "pickled" / "ae.pt").write_bytes(pickle.dumps({"W": np.ones(3)}))
    (root / "pickled" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder",
                                                                          "activation_dim": D, "dict_size": N}}))
    (root / "model.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    (root / "pickles").mkdir()
    (root / "pickles" / "sae.pth").write_bytes(pickle.dumps([1]))
    (root / "dl_class").mkdir()
    torch.save({"W_enc": torch.zeros(D, N)}, root / "dl_class" / "ae.pt")
    (root / "dl_class" / "config.json").write_text(json.dumps({"trainer": {"dict_class": "CrossCoder",
                                                                           "activation_dim": D, "dict_size": N}}))
    before = tree(tmp_path)
    cases = [("unknown", DictionaryNotFoundError, "no dictionary"),
             ("missing", DictionaryFormatError, "threshold"),
             ("shape/layers.1", DictionaryFormatError, "shape"),
             ("field/layers.1", DictionaryFormatError, "signed"),
             ("gs2field", DictionaryFormatError, "dtype"),
             ("gs2arch", DictionaryFormatError, "architecture='relu'"),
             ("pickled", DictionaryFormatError, "never unpickled"),
             ("model.pkl", DictionaryFormatError, "never unpickled"),
             ("pickles", DictionaryFormatError, "never unpickled"),
             ("dl_class", DictionaryFormatError, "dict_class='CrossCoder'"),
             ("does/not/exist", DictionaryNotFoundError, "does not exist")]
    for sub, err, msg in cases:
        with pytest.raises(err) as ei:
            load_dictionary(root / sub)
        text = str(ei.value)
        assert isinstance(ei.value, CircuitDiscoveryError) and msg in text and "\n" not in text, (sub, text)
    assert tree(tmp_path) == before  # nothing written, nothing removed


def test_pickle_payload_is_never_executed(tmp_path):
    """A torch file whose pickle would run code: weights_only loading refuses it before anything runs."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"encoder.weight": Evil()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "activation_dim": D,
                                                                "dict_size": N}}))
    with pytest.raises(DictionaryFormatError, match="weights-only"):
        load_dictionary(folder)
    assert not marker.exists()
    with pytest.raises(DictionaryFormatError, match="never unpickled"):
        load_dictionary(folder / "ae.pt")
    assert not marker.exists()
