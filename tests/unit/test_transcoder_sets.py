"""load_transcoder_set: per-layer and cross-layer sets written here in each source's layout (SAELens folders,
circuit-tracer config.yaml sets and CLTs, Gemma Scope 2 per-layer sets and CLTs, lists), loaded from folders and
from a temporary Hugging Face cache with the network refused, and compared with numpy references (1e-6)."""
from __future__ import annotations

import inspect
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.sae.pretrained import (
    CrossLayerTranscoder,
    DictionaryFormatError,
    DictionaryMismatchError,
    DictionaryNotFoundError,
    TranscoderSet,
    load_dictionary,
    load_transcoder_set,
)

D, N, L = 6, 10, 3
TOL = dict(atol=1e-6, rtol=1e-6)
CLT_SKIP = "skip" in inspect.signature(CrossLayerTranscoder.__init__).parameters


def f32(*shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def relu(a):
    return np.maximum(a, 0.0)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, no_network):
    """An empty Hugging Face cache; ``add(repo_id)`` makes a snapshot folder and returns it."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def add(repo_id: str) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "1" * 40
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        return snap

    return add


# ------------------------------------------------------------------ per-layer SAELens folders
def _saelens_tc(folder: Path, layer: int, seed: int, hook_in="mlp.hook_in") -> dict[str, np.ndarray]:
    w = {"W_enc": f32(D, N, seed=seed), "W_dec": f32(N, D, seed=seed + 1), "b_enc": f32(N, seed=seed + 2),
         "b_dec": f32(D, seed=seed + 3), "threshold": np.abs(f32(N, seed=seed + 4, scale=0.5))}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu_transcoder", "d_in": D, "d_sae": N, "d_out": D, "dtype": "float32",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"model_name": "gemma-3-270m", "hook_name": f"blocks.{layer}.{hook_in}",
                     "hook_name_out": f"blocks.{layer}.hook_mlp_out"}}))
    save_file({k: t(v) for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    return w


def test_folder_of_saelens_transcoders_and_list(tmp_path):
    ws = {l: _saelens_tc(tmp_path / "set" / f"layer_{l}", l, 10 * l) for l in range(L)}
    ts = load_transcoder_set(tmp_path / "set", dtype="float64")
    assert isinstance(ts, TranscoderSet) and ts.kind == "transcoder" and ts.layers == [0, 1, 2]
    assert (ts.hook_in, ts.hook_out) == ("blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out")
    x = np.random.default_rng(1).standard_normal((4, D))
    for l, w in ws.items():
        W = {k: v.astype(np.float64) for k, v in w.items()}
        pre = x @ W["W_enc"] + W["b_enc"]
        feats = relu(pre) * (pre > W["threshold"])
        torch.testing.assert_close(ts.per_layer[l].encode(t(x)), t(feats), **TOL)
        torch.testing.assert_close(ts.per_layer[l](t(x)).recon, t(feats @ W["W_dec"] + W["b_dec"]), **TOL)
    assert load_transcoder_set(tmp_path / "set", layers=[1]).layers == [1]
    listed = load_transcoder_set([tmp_path / "set" / "layer_2", tmp_path / "set" / "layer_0"])
    assert listed.layers == [0, 2]
    # one set, one hook pair: a layer reading another hook is refused
    _saelens_tc(tmp_path / "mixed" / "a", 0, 1)
    _saelens_tc(tmp_path / "mixed" / "b", 1, 2, hook_in="hook_resid_mid")
    with pytest.raises(DictionaryFormatError, match="one hook pair"):
        load_transcoder_set(tmp_path / "mixed")


# ------------------------------------------------------------------ circuit-tracer
def _ct_layer(path: Path, seed: int, *, threshold=True, skip=False) -> dict[str, np.ndarray]:
    w = {"W_enc": f32(N, D, seed=seed), "W_dec": f32(N, D, seed=seed + 1), "b_enc": f32(N, seed=seed + 2),
         "b_dec": f32(D, seed=seed + 3)}
    if threshold:
        w["activation_function.threshold"] = np.abs(f32(N, seed=seed + 4, scale=0.5))
    if skip:
        w["W_skip"] = f32(D, D, seed=seed + 5, scale=0.3)
    save_file({k: t(v) for k, v in w.items()}, str(path))
    return w


def test_circuit_tracer_transcoder_set(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    ws = [_ct_layer(folder / f"layer_{l}.safetensors", 20 + 10 * l, skip=True) for l in range(L)]
    (folder / "config.yaml").write_text(
        "model_name: meta-llama/Llama-3.2-1B\nmodel_kind: transcoder_set\n"
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: mlp.hook_out\n")
    ts = load_transcoder_set(folder, dtype="float64")
    # Llama has no norm after its MLP: circuit-tracer's mlp.hook_out is this project's hook_mlp_out
    assert (ts.hook_in, ts.hook_out, ts.kind) == ("blocks.{layer}.hook_resid_mid", "blocks.{layer}.hook_mlp_out",
                                                  "skip_transcoder")
    x = np.random.default_rng(2).standard_normal((5, D))
    for l, w in enumerate(ws):
        W = {k: v.astype(np.float64) for k, v in w.items()}
        pre = x @ W["W_enc"].T + W["b_enc"]
        feats = pre * (pre > W["activation_function.threshold"])
        recon = feats @ W["W_dec"] + W["b_dec"] + x @ W["W_skip"].T
        torch.testing.assert_close(ts.per_layer[l](t(x)).recon, t(recon), **TOL)
        assert ts.per_layer[l].hook_in == f"blocks.{l}.hook_resid_mid"
    # the same set for Gemma 2: mlp.hook_out is before post_feedforward_layernorm -> a typed error naming it
    (folder / "config.yaml").write_text(
        "model_name: google/gemma-2-2b\nmodel_kind: transcoder_set\n"
        "feature_input_hook: hook_resid_mid\nfeature_output_hook: mlp.hook_out\n")
    with pytest.raises(DictionaryFormatError, match="mlp.hook_out.*post_feedforward_layernorm"):
        load_transcoder_set(folder)
    # TopK from config.yaml (files without thresholds), unknown config fields refused
    topk = tmp_path / "topk"
    topk.mkdir()
    for l in range(2):
        _ct_layer(topk / f"layer_{l}.safetensors", 60 + l, threshold=False)
    (topk / "config.yaml").write_text("model_name: gemma-3-270m\nmodel_kind: transcoder_set\nactivation: topk\n"
                                      "k: 2\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: hook_mlp_out\n")
    ts = load_transcoder_set(topk)
    assert ts.per_layer[0].architecture == "topk_no_relu" and int((ts.per_layer[0].encode(t(x).float()) != 0)
                                                                  .sum(-1).max()) == 2
    (topk / "config.yaml").write_text((topk / "config.yaml").read_text() + "lazy_decoder: true\n")
    with pytest.raises(DictionaryFormatError, match="lazy_decoder"):
        load_transcoder_set(topk)


def _clt_oracle(W_enc, b_enc, thr, W_dec, b_dec, xs, relu_form):
    """Each layer's features from its own input; the reconstruction at t sums the decoders of layers s <= t."""
    feats = []
    for l, x in enumerate(xs):
        pre = x @ W_enc[l] + b_enc[l]
        gate = pre > thr[l]
        feats.append((relu(pre) if relu_form else pre) * gate)
    recon = [b_dec[t_] + sum(feats[s] @ W_dec[s][:, t_ - s] for s in range(t_ + 1)) for t_ in range(len(xs))]
    return feats, recon


def test_circuit_tracer_clt(tmp_path):
    folder = tmp_path / "clt"
    folder.mkdir()
    W_enc, b_enc, thr, W_dec, b_dec = [], [], [], [], []
    for i in range(L):
        we, be, th, bd = f32(N, D, seed=100 + i), f32(N, seed=110 + i), f32(N, seed=120 + i, scale=0.5), \
            f32(D, seed=130 + i)
        wd = f32(N, L - i, D, seed=140 + i)
        save_file({f"W_enc_{i}": t(we), f"b_enc_{i}": t(be), f"b_dec_{i}": t(bd), f"threshold_{i}": t(th)},
                  str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": t(wd)}, str(folder / f"W_dec_{i}.safetensors"))
        W_enc.append(we.T.astype(np.float64))
        b_enc.append(be.astype(np.float64))
        thr.append(th.astype(np.float64))
        W_dec.append(wd.astype(np.float64))
        b_dec.append(bd.astype(np.float64))
    (folder / "config.yaml").write_text("model_name: gemma-2-2b\nmodel_kind: cross_layer_transcoder\n"
                                       "feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n")
    ts = load_transcoder_set(folder, dtype="float64")
    assert ts.kind == "cross_layer" and ts.cross_layer is not None and ts.layers == [0, 1, 2]
    assert (ts.hook_in, ts.hook_out) == ("blocks.{layer}.hook_resid_mid", "blocks.{layer}.hook_mlp_out")
    xs = [np.random.default_rng(3 + l).standard_normal((4, D)) for l in range(L)]
    feats, recon = _clt_oracle(W_enc, b_enc, thr, W_dec, b_dec, xs, relu_form=False)
    assert any((f < 0).any() for f in feats)  # negative thresholds: circuit-tracer's form keeps negatives
    got = ts.cross_layer.forward({l: t(x) for l, x in enumerate(xs)})
    for l in range(L):
        torch.testing.assert_close(ts.cross_layer.encode(l, t(xs[l])), t(feats[l]), **TOL)
        torch.testing.assert_close(got[l], t(recon[l]), **TOL)
    with pytest.raises(DictionaryFormatError, match="loaded whole"):
        load_transcoder_set(folder, layers=[0, 1])


# ------------------------------------------------------------------ Gemma Scope 2
def _gs2_file(folder: Path, layer: int, seed: int, d=D, affine=False, clt_layers: int | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    w = {"w_enc": f32(d, N, seed=seed), "b_enc": f32(N, seed=seed + 1), "b_dec": f32(d, seed=seed + 2),
         "threshold": f32(N, seed=seed + 3, scale=0.5)}
    w["w_dec"] = f32(N, clt_layers, d, seed=seed + 4) if clt_layers else f32(N, d, seed=seed + 4)
    if clt_layers is None:
        w["threshold"] = np.abs(w["threshold"])
    if affine:
        w["affine_skip_connection"] = f32(d, d, seed=seed + 5, scale=0.3)
    name = f"params_layer_{layer}.safetensors" if clt_layers else "params.safetensors"
    save_file({k: t(v) for k, v in w.items()}, str(folder / name))
    kind = "clt" if clt_layers else "transcoder"
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "width": N,
        "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu", "l0": 5,
        "affine_connection": affine, "type": kind}))
    return w


def test_gemma_scope_2_per_layer_set_from_the_hf_cache(hf_cache):
    snap = hf_cache("google/gemma-scope-2-270m-pt")
    ws = {l: _gs2_file(snap / "transcoder_all" / f"layer_{l}_width_16k_l0_small_affine", l, 200 + 10 * l,
                       affine=True) for l in range(L)}
    _gs2_file(snap / "transcoder_all" / "layer_0_width_16k_l0_small", 0, 300)  # another set beside it
    ts = load_transcoder_set("google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small_affine",
                             dtype="float64")
    assert ts.layers == [0, 1, 2] and ts.kind == "skip_transcoder"
    assert (ts.hook_in, ts.hook_out) == ("blocks.{layer}.mlp.hook_in", "blocks.{layer}.hook_mlp_out")
    x = np.random.default_rng(4).standard_normal((3, D))
    for l, w in ws.items():
        W = {k: v.astype(np.float64) for k, v in w.items()}
        pre = x @ W["w_enc"] + W["b_enc"]
        feats = (pre > W["threshold"]) * relu(pre)
        recon = feats @ W["w_dec"] + W["b_dec"] + x @ W["affine_skip_connection"]
        torch.testing.assert_close(ts.per_layer[l](t(x)).recon, t(recon), **TOL)
    assert load_transcoder_set("google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small").layers == [0]
    cache = snap.parents[2]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*"))
    with pytest.raises(DictionaryNotFoundError, match="not in the local Hugging Face cache"):
        load_transcoder_set("google/gemma-scope-2-270m-pt/transcoder_all/width_262k_l0_big")
    with pytest.raises(DictionaryNotFoundError, match="HF_HUB_OFFLINE"):  # allowed, but offline: no download
        load_transcoder_set("google/gemma-scope-2-1b-pt/clt/width_262k_l0_medium", allow_download=True)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in cache.rglob("*")) == before  # the cache untouched


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_clt(tmp_path, affine):
    folder = tmp_path / "gemma-scope-2-270m-pt" / "clt" / f"width_16k_l0_medium{'_affine' if affine else ''}"
    ws = [_gs2_file(folder, i, 400 + 10 * i, affine=affine, clt_layers=L) for i in range(L)]
    with pytest.raises(DictionaryFormatError, match="load_transcoder_set"):  # one layer is not a dictionary
        load_dictionary(folder / "params_layer_1.safetensors")
    if affine and not CLT_SKIP:
        with pytest.raises(DictionaryFormatError, match="affine_skip_connection"):
            load_transcoder_set(folder)
        return
    ts = load_transcoder_set(folder, dtype="float64")
    assert ts.kind == "cross_layer" and (ts.hook_in, ts.hook_out) == ("blocks.{layer}.mlp.hook_in",
                                                                      "blocks.{layer}.hook_mlp_out")
    W_enc = [w["w_enc"].astype(np.float64) for w in ws]
    xs = [np.random.default_rng(5 + l).standard_normal((4, D)) for l in range(L)]
    # Gemma Scope 2: relu(pre) * (pre > threshold); decoders w_dec[i, :, i:, :]
    feats, recon = _clt_oracle(W_enc, [w["b_enc"].astype(np.float64) for w in ws],
                               [w["threshold"].astype(np.float64) for w in ws],
                               [w["w_dec"].astype(np.float64)[:, i:, :] for i, w in enumerate(ws)],
                               [w["b_dec"].astype(np.float64) for w in ws], xs, relu_form=True)
    assert any((w["threshold"] < 0).any() for w in ws)  # the relu form matters: negatives must not pass
    got = ts.cross_layer.forward({l: t(x) for l, x in enumerate(xs)})
    for l in range(L):
        torch.testing.assert_close(ts.cross_layer.encode(l, t(xs[l])), t(feats[l]), **TOL)
        expected = recon[l] + (xs[l] @ ws[l]["affine_skip_connection"].astype(np.float64) if affine else 0.0)
        torch.testing.assert_close(got[l], t(expected), **TOL)


def test_sets_fit_the_tiny_model_and_mismatches_are_caught(tmp_path):
    """A Gemma Scope 2 set with the tiny Gemma 3's width passes TranscoderSet.check_model (its hooks are the
    model's); one with another width is refused in one line."""
    from circuit_discovery.models import load_model

    model = load_model("tiny-gemma3", device="cpu")
    d, n = model.cfg.d_model, model.cfg.n_layers
    for l in range(n):
        _gs2_file(tmp_path / "ok" / "transcoder_all" / f"layer_{l}_width_1k_l0_small", l, 500 + l, d=d)
        _gs2_file(tmp_path / "bad" / "transcoder_all" / f"layer_{l}_width_1k_l0_small", l, 600 + l, d=d + 1)
    load_transcoder_set(tmp_path / "ok" / "transcoder_all" / "width_1k_l0_small").check_model(model)
    bad = load_transcoder_set(tmp_path / "bad" / "transcoder_all" / "width_1k_l0_small")
    with pytest.raises(DictionaryMismatchError, match="d_model") as ei:
        bad.check_model(model)
    assert "\n" not in str(ei.value)


def test_circuit_tracer_set_listing_hub_files(hf_cache):
    """A circuit-tracer config.yaml whose ``transcoders`` are hf:// URIs of Gemma Scope 1 files, read from the
    local cache (GS1 transcoders read ln2.hook_normalized, before the gain)."""
    gs = hf_cache("google/gemma-scope-2b-pt-transcoders")
    uris = []
    for l in range(2):
        folder = gs / f"layer_{l}" / "width_16k" / "average_l0_76"
        folder.mkdir(parents=True)
        w = {"W_enc": f32(D, N, seed=700 + l), "W_dec": f32(N, D, seed=710 + l), "b_enc": f32(N, seed=720 + l),
             "b_dec": f32(D, seed=730 + l), "threshold": np.abs(f32(N, seed=740 + l))}
        np.savez(folder / "params.npz", **w)
        uris.append(f"hf://google/gemma-scope-2b-pt-transcoders/layer_{l}/width_16k/average_l0_76/params.npz")
    cfg_repo = hf_cache("mntss/gemma-scope-transcoders")
    (cfg_repo / "config.yaml").write_text(
        "model_name: google/gemma-2-2b\nmodel_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\n"
        "feature_output_hook: hook_mlp_out\ntranscoders:\n" + "".join(f"  - {u}\n" for u in uris))
    ts = load_transcoder_set("mntss/gemma-scope-transcoders")
    assert ts.layers == [0, 1] and (ts.hook_in, ts.hook_out) == ("blocks.{layer}.ln2.hook_normalized",
                                                                 "blocks.{layer}.hook_mlp_out")
    assert ts.per_layer[1].source_format == "gemma_scope_1"


def test_bad_set_sources(tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    _ct_layer(folder / "layer_0.safetensors", 1)
    cases = [(folder, DictionaryFormatError, "config.yaml"),
             (tmp_path / "empty", DictionaryNotFoundError, "does not exist")]
    sae = tmp_path / "sae" / "layer_0"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D, "d_sae": N,
                                              "metadata": {"hook_name": "blocks.0.hook_resid_post"}}))
    save_file({"W_enc": torch.zeros(D, N), "W_dec": torch.zeros(N, D), "b_enc": torch.zeros(N),
               "b_dec": torch.zeros(D)}, str(sae / "sae_weights.safetensors"))
    cases.append((tmp_path / "sae", DictionaryFormatError, "not a transcoder"))
    for src, err, msg in cases:
        with pytest.raises(err, match=msg) as ei:
            load_transcoder_set(src)
        assert isinstance(ei.value, CircuitDiscoveryError) and "\n" not in str(ei.value)


def test_download_only_when_allowed_and_online(tmp_path, monkeypatch, no_network):
    """The download branch, with huggingface_hub's snapshot_download replaced by a fake Hub: nothing is fetched
    unless allow_download=True; then only the set's files are asked for."""
    import huggingface_hub
    import huggingface_hub.constants as hc
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    snap = tmp_path / "fake_hub_snapshot"
    calls: list[dict] = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "local_files_only": local_files_only, "allow_patterns": allow_patterns})
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        for l in range(2):
            _gs2_file(snap / "transcoder_all" / f"layer_{l}_width_16k_l0_big", l, 800 + l)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = "google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_big"
    with pytest.raises(DictionaryNotFoundError, match="allow_download=True"):
        load_transcoder_set(source)
    assert [c["local_files_only"] for c in calls] == [True] and not snap.exists()
    ts = load_transcoder_set(source, allow_download=True)
    assert ts.layers == [0, 1] and calls[-1]["allow_patterns"] == [
        "transcoder_all/width_16k_l0_big/*", "transcoder_all/layer_*_width_16k_l0_big/*"]


def test_circuit_tracer_set_of_gemma_scope_2_files_checks_their_hooks(tmp_path):
    """A config.yaml listing Gemma Scope 2 files (relative paths): the files' own config.json says they read the
    pre-MLP norm's output after the gain (mlp.hook_in); a config.yaml naming another hook is refused."""
    folder = tmp_path / "set"
    for l in range(2):
        _gs2_file(folder / "files" / f"layer_{l}_width_16k_l0_small", l, 900 + l)
    listing = "transcoders:\n" + "".join(f"  - files/layer_{l}_width_16k_l0_small/params.safetensors\n"
                                         for l in range(2))
    head = "model_name: google/gemma-3-270m\nmodel_kind: transcoder_set\nfeature_output_hook: hook_mlp_out\n"
    (folder / "config.yaml").write_text(head + "feature_input_hook: mlp.hook_in\n" + listing)
    ts = load_transcoder_set(folder)
    assert ts.layers == [0, 1] and ts.hook_in == "blocks.{layer}.mlp.hook_in"
    (folder / "config.yaml").write_text(head + "feature_input_hook: ln2.hook_normalized\n" + listing)
    with pytest.raises(DictionaryFormatError, match="ln2.hook_normalized.*mlp.hook_in"):
        load_transcoder_set(folder)


def test_sparsify_run_folder_as_a_set(tmp_path):
    """A sparsify training run: one transcoder folder per hookpoint, the run's config.json (naming the model) and
    pickled optimizer states beside them, which are never opened."""
    run = tmp_path / "checkpoints" / "run"
    for l in range(2):
        folder = run / f"layers.{l}.mlp"
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": N, "k": 2,
                                                     "transcode": True, "d_in": D}))
        save_file({"encoder.weight": t(f32(N, D, seed=l)), "encoder.bias": t(f32(N, seed=10 + l)),
                   "W_dec": t(f32(N, D, seed=20 + l)), "b_dec": t(f32(D, seed=30 + l))},
                  str(folder / "sae.safetensors"))
    (run / "config.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-0.5B", "sae": {"k": 2}}))
    (run / "optimizer_0.pt").write_bytes(b"\x80\x04not a real pickle")
    ts = load_transcoder_set(run, layers=[1])
    assert ts.layers == [1] and (ts.hook_in, ts.hook_out) == ("blocks.{layer}.mlp.hook_in",
                                                              "blocks.{layer}.hook_mlp_out")
    (run / "config.json").write_text(json.dumps({"model": "google/gemma-3-270m"}))
    with pytest.raises(DictionaryFormatError, match="post_feedforward_layernorm"):
        load_transcoder_set(run)
