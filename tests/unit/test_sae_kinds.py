"""The dictionary kinds the ecosystem reads: JumpReLU (skip) transcoders, TopK, the cross-layer transcoder, their
SAELens names, and the detection of dictionaries cached under the old meaning of ``ln2.hook_normalized``.

Oracles: closed forms in float64 numpy (JumpReLU, skip term, CLT decode as an explicit sum over source layers),
reload equality to 1e-6, reconstruction loss against the untrained initial value.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuit_discovery.sae import SAEConfig, SAETrainConfig, create_sae, load_sae, save_sae, train_saes
from circuit_discovery.sae.architectures import batch_topk
from circuit_discovery.sae.clt_training import (
    CLTTrainConfig,
    clt_reconstruction_metrics,
    load_clt,
    save_clt,
    train_clt,
)
from circuit_discovery.sae.dictionaries import SAE_KINDS, kind_settings
from circuit_discovery.sae.io import (
    HOOK_SEMANTICS,
    convert_legacy_hook_cfg,
    is_legacy_hook_cfg,
    saelens_loadable,
    save_cached_sae,
)
from circuit_discovery.sae.training import legacy_cache_key
from circuit_discovery.sae.transcoder_set import CrossLayerTranscoder

PER_LAYER = [k for k in SAE_KINDS if k != "clt"]


def sparse_map_data(n=4096, d=16, n_feat=48, seed=0):
    """x = sparse codes @ D_in; y = (sparse codes @ D_out) + x @ A: a transcoder target with a linear part."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, n_feat, generator=g) * (torch.rand(n, n_feat, generator=g) < 0.08)
    d_in = torch.randn(n_feat, d, generator=g)
    d_out = torch.randn(n_feat, d, generator=g)
    a = torch.randn(d, d, generator=g) * 0.3
    x = codes @ d_in
    return x, codes @ d_out + x @ a


def tiny_cfgs(kind: str, tokens: int = 8192, **kw) -> SAETrainConfig:
    return SAETrainConfig("blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out", training_tokens=tokens,
                          train_batch_size_tokens=256, k=8, d_sae=64, log_every=1, lr=1e-2,
                          **{**kind_settings(kind), **kw})


@pytest.mark.parametrize("kind", PER_LAYER)
def test_each_kind_trains_and_round_trips(tmp_path, kind):
    x, y = sparse_map_data()
    cfg = tiny_cfgs(kind)
    r = train_saes({cfg.hook_name: x, cfg.hook_name_out: y}, cfg, progress=False)[cfg.key]
    first, last = r.history[0]["mse"], r.history[-1]["mse"]
    assert last < 0.5 * first, (first, last)  # reconstruction loss falls well below its initial value
    sae = r.sae
    assert (sae.skip is not None) == (kind == "jumprelu_skip_transcoder")
    if kind.startswith("jumprelu"):
        assert type(sae).__name__ == "JumpReLUSAE"
        l0 = float((sae.encode(x) != 0).sum(-1).float().mean())
        assert 2 <= l0 <= 16  # BatchTopK k=8 on average -> JumpReLU L0 near k
    folder = save_sae(sae, tmp_path / kind)
    again = load_sae(folder)
    xt = x[:64]
    torch.testing.assert_close(again(xt).recon, sae(xt).recon, atol=1e-6, rtol=0)
    torch.testing.assert_close(again.encode(xt), sae.encode(xt), atol=1e-6, rtol=0)
    arch = json.loads((folder / "cfg.json").read_text())["architecture"]
    assert arch == {"topk_transcoder": "topk", "jumprelu_transcoder": "jumprelu_transcoder",
                    "jumprelu_skip_transcoder": "jumprelu_skip_transcoder"}[kind]
    assert saelens_loadable(sae)


def test_skip_transcoder_beats_plain_on_a_linear_target():
    """The target has a dense linear part x @ A: the skip connection can carry it, the sparse code cannot fully."""
    x, y = sparse_map_data(seed=1)
    mses = {}
    for kind in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        cfg = tiny_cfgs(kind, tokens=16384)
        r = train_saes({cfg.hook_name: x, cfg.hook_name_out: y}, cfg, progress=False)[cfg.key]
        with torch.no_grad():
            mses[kind] = float((r.sae(x).recon - y).pow(2).sum(-1).mean())
    assert mses["jumprelu_skip_transcoder"] < mses["jumprelu_transcoder"]


def test_jumprelu_forward_equals_closed_form():
    sae = create_sae(SAEConfig(d_in=6, d_sae=10, architecture="jumprelu", transcoder=True, d_out=5), seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.copy_(torch.randn(p.shape, generator=g))
        sae.set_threshold(torch.rand(10, generator=g))
    x = torch.randn(7, 6, generator=g)
    w_enc, b_enc, w_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    theta = sae.threshold.detach().double().numpy()
    z = x.double().numpy() @ w_enc + b_enc
    f = np.where(z > theta, z, 0.0)  # JumpReLU: z * H(z - theta)
    sae.eval()
    with torch.no_grad():
        np.testing.assert_allclose(sae.encode(x).double().numpy(), f, atol=1e-5)
        np.testing.assert_allclose(sae(x).recon.double().numpy(), f @ w_dec + b_dec, atol=1e-5)
    assert sae.skip is None


def test_skip_contributes_exactly_x_at_w_skip():
    sae = create_sae(SAEConfig(d_in=6, d_sae=10, architecture="jumprelu", transcoder=True, skip=True, d_out=4),
                     seed=1).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(4, 6, generator=g))
        sae.b_dec.copy_(torch.randn(4, generator=g))
    x = torch.randn(9, 6, generator=g)
    assert tuple(sae.skip.shape) == (6, 4)  # [d_in, d_out]
    torch.set_grad_enabled(False)
    try:
        _check_skip(sae, x)
    finally:
        torch.set_grad_enabled(True)


def _check_skip(sae, x):
    full = sae(x).recon.double().numpy()
    no_skip = sae.decode(sae.encode(x)).double().numpy()
    np.testing.assert_allclose(full - no_skip, x.double().numpy() @ sae.W_skip.detach().double().numpy().T,
                               atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x), sae(x).recon, atol=1e-6, rtol=0)
    # folding a training-time scaling keeps the function: W_skip scaled by scale_in / scale_out
    ref = sae(x * 2.0).recon / 4.0
    sae.fold_activation_norm_scaling_factor(2.0, 4.0)
    torch.testing.assert_close(sae(x).recon, ref, atol=1e-5, rtol=0)


def test_batch_topk_keeps_k_per_token_on_average():
    pre = torch.randn(32, 50, generator=torch.Generator().manual_seed(0))
    out = batch_topk(pre, 5)
    assert int((out != 0).sum()) == 5 * 32
    kept = pre[out != 0]
    assert float(kept.min()) >= float(pre[out == 0].max())  # the largest of the whole batch
    torch.testing.assert_close(out[out != 0], kept)


def clt_data(n_layers=3, n=2048, d=8, seed=0):
    """Each layer's input and output are sparse codes through random dictionaries; layer l's codes also write to
    every later layer's output (the structure a CLT represents)."""
    acts = {}
    codes = []
    for l in range(n_layers):
        x, y = sparse_map_data(n=n, d=d, n_feat=24, seed=seed + l)
        codes.append(x)
        acts[f"blocks.{l}.mlp.hook_in"] = x
        acts[f"blocks.{l}.hook_mlp_out"] = y + sum(0.3 * c for c in codes[:-1])
    return acts


def test_clt_decode_is_the_sum_over_source_layers():
    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(3, 5, 7, 4)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        clt.threshold.abs_()
    xs = {l: torch.randn(6, 5, generator=g) for l in range(3)}
    torch.set_grad_enabled(False)
    try:
        _check_clt_sum(clt, xs)
    finally:
        torch.set_grad_enabled(True)


def _check_clt_sum(clt, xs):
    W_enc, b_enc, thr, b_dec = (t.detach().double().numpy() for t in (clt.W_enc, clt.b_enc, clt.threshold, clt.b_dec))
    feats = {}
    for s in range(3):
        z = xs[s].double().numpy() @ W_enc[s] + b_enc[s]
        feats[s] = np.where(z > thr[s], z, 0.0)
    out = clt(xs)
    for t in range(3):
        expected = b_dec[t].copy()
        for s in range(t + 1):  # explicit sum over source layers s <= t, feature by feature
            w = clt.W_dec[s].detach().double().numpy()[:, t - s]  # [d_sae, d_out]
            for i in range(7):
                expected = expected + feats[s][:, i : i + 1] * w[i]
        np.testing.assert_allclose(out[t].detach().double().numpy(), expected, atol=1e-5)


def test_clt_trains_saves_and_reloads(tmp_path):
    acts = clt_data()
    cfg = CLTTrainConfig(n_layers=3, d_sae=48, k=6, training_tokens=16384, train_batch_size_tokens=256, log_every=1,
                         lr=1e-2)
    r = train_clt(acts, cfg, progress=False)
    assert r.history[-1]["loss"] < 0.5 * r.history[0]["loss"], (r.history[0]["loss"], r.history[-1]["loss"])
    m = clt_reconstruction_metrics(r.clt, acts, 2)
    assert m["explained_variance"] > 0.3 and 1 <= m["l0"] <= 12
    folder = save_clt(r.clt, tmp_path / "clt", extra={"model_name": "toy"})
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "cfg.json"]
    again = load_clt(folder)
    xs = {l: acts[f"blocks.{l}.mlp.hook_in"][:32] for l in range(3)}
    ref, got = r.clt(xs), again(xs)
    for t in range(3):
        torch.testing.assert_close(got[t], ref[t], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- old hook semantics
def legacy_folder(tmp_path, hook="blocks.2.ln2.hook_normalized", marker=False):
    sae = create_sae(SAEConfig(d_in=6, d_sae=12, architecture="topk", k=3, transcoder=True,
                               metadata={"hook_name": hook, "hook_name_out": "blocks.2.hook_mlp_out"}), seed=0)
    folder = save_sae(sae, tmp_path / "f")
    d = json.loads((folder / "cfg.json").read_text())
    if not marker:  # what this package wrote before the hook names took TransformerLens's meaning
        del d["circuit_discovery"]["hook_semantics"]
    (folder / "cfg.json").write_text(json.dumps(d))
    return sae, folder


def test_old_hook_dictionaries_are_detected_and_renamed_exactly(tmp_path):
    sae, folder = legacy_folder(tmp_path)
    d = json.loads((folder / "cfg.json").read_text())
    assert is_legacy_hook_cfg(d)
    conv = convert_legacy_hook_cfg(d)
    assert not is_legacy_hook_cfg(conv) and conv["circuit_discovery"]["hook_semantics"] == HOOK_SEMANTICS
    loaded = load_sae(folder)
    assert loaded.cfg.metadata["hook_name"] == "blocks.2.mlp.hook_in"  # never reused as the pre-gain value
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(loaded, name), getattr(sae, name), atol=0, rtol=0)


def test_new_semantics_ln2_hook_is_kept(tmp_path):
    """A folder with the marker that names ln2.hook_normalized means the pre-gain value: not renamed."""
    _, folder = legacy_folder(tmp_path, marker=True)
    assert not is_legacy_hook_cfg(json.loads((folder / "cfg.json").read_text()))
    assert load_sae(folder).cfg.metadata["hook_name"] == "blocks.2.ln2.hook_normalized"


def test_foreign_saelens_ln2_hook_is_not_touched():
    d = {"architecture": "jumprelu_transcoder", "metadata": {"hook_name": "blocks.2.ln2.hook_normalized"}}
    assert not is_legacy_hook_cfg(d)  # written by SAELens / Gemma Scope: TransformerLens's (pre-gain) meaning


def test_cached_old_hook_dictionary_is_converted_not_retrained(tmp_path, monkeypatch):
    """train_saes_on_model finds a dictionary cached under the old hook name, converts it (same weights) into the
    new key, and does not train."""
    from circuit_discovery.models import load_model
    from circuit_discovery.sae import train_saes_on_model
    from circuit_discovery.sae.io import load_cached_sae, sae_cache_key

    model = load_model("tiny-gemma3", device="cpu")
    cfg = SAETrainConfig("blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out", training_tokens=256,
                         train_batch_size_tokens=64, model_name="tiny-gemma3", context_size=16)
    d = model.cfg.d_model
    old = create_sae(SAEConfig(d_in=d, architecture="topk", k=64, transcoder=True,
                               metadata={"hook_name": "blocks.1.ln2.hook_normalized",
                                         "hook_name_out": "blocks.1.hook_mlp_out"}), seed=5)
    old_key = legacy_cache_key(cfg, "c1")
    folder = save_cached_sae(tmp_path, old_key, old, extra={"cfg": {}})
    js = json.loads((folder / "cfg.json").read_text())
    del js["circuit_discovery"]["hook_semantics"]
    (folder / "cfg.json").write_text(json.dumps(js))

    def no_training(*a, **k):
        raise AssertionError("trained although a converted cached dictionary exists")

    monkeypatch.setattr("circuit_discovery.sae.training.train_saes", no_training)
    out = train_saes_on_model(model, ["The capital of France is Paris."] * 4, [cfg], corpus_id="c1",
                              cache_dir=tmp_path, context_size=16, progress=False)
    got = out[cfg.key]
    assert got.cfg.metadata["hook_name"] == "blocks.1.mlp.hook_in"
    torch.testing.assert_close(got.W_dec, old.W_dec, atol=0, rtol=0)
    new = load_cached_sae(tmp_path, sae_cache_key("tiny-gemma3", cfg.key, cfg, "c1"))
    assert new is not None and new.cfg.metadata["hook_name"] == "blocks.1.mlp.hook_in"


def test_legacy_cache_key_matches_the_old_config_dict():
    """New optional SAETrainConfig fields at their defaults leave to_dict() -- hence old cache keys -- unchanged."""
    cfg = SAETrainConfig("blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out")
    d = cfg.to_dict()
    assert "skip" not in d and "jumprelu_recipe" not in d and SAETrainConfig(**d) == cfg
    assert "skip" in SAETrainConfig("a", hook_name_out="b", skip=True).to_dict()
    assert legacy_cache_key(SAETrainConfig("blocks.0.hook_resid_post", model_name="m"), "c") is None


def test_train_transcoders_kinds_on_the_tiny_model(tmp_path):
    from circuit_discovery.models import load_model
    from circuit_discovery.sae.dictionaries import train_transcoders

    model = load_model("tiny-gemma3", device="cpu")
    kw = dict(training_tokens=1024, n_sequences=4, progress=False, cache_dir=tmp_path / "saes",
              corpus_cache_dir=tmp_path)
    ds = train_transcoders(model, layers=[0, 1], kind="jumprelu_skip_transcoder", **kw)
    assert ds.kind == "jumprelu_skip_transcoder" and ds.transcoder_set.kind == "skip_transcoder"
    assert set(ds.transcoders) == {0, 1} and ds.transcoder_set.per_layer[0] is ds.transcoders[0]
    ds.transcoder_set.check_model(model)
    clt = train_transcoders(model, kind="clt", clt_d_sae=16, k=4, evaluate=True, eval_tokens=16, **kw)
    assert clt.transcoders == {} and clt.transcoder_set.cross_layer is not None
    assert clt.transcoder_set.cross_layer.n_layers == model.cfg.n_layers
    assert set(clt.metrics) == set(range(model.cfg.n_layers))
    clt.transcoder_set.check_model(model)
    again = train_transcoders(model, kind="clt", clt_d_sae=16, k=4, **kw)  # from the cache
    assert again.trained == []
    torch.testing.assert_close(again.transcoder_set.cross_layer.W_dec[0], clt.transcoder_set.cross_layer.W_dec[0])
    with pytest.raises(Exception, match="unknown dictionary kind"):
        train_transcoders(model, kind="gated_transcoder", **kw)


def test_evaluation_includes_the_skip_term():
    """evaluate_sae and reconstruction_metrics splice decode(f) + x @ skip: their EV equals the EV of forward()'s
    reconstruction on the same harvested tokens, and differs from the EV without the skip term."""
    from circuit_discovery.models import load_model
    from circuit_discovery.sae import evaluate_sae, harvest_activations
    from circuit_discovery.sae.evaluate import explained_variance, reconstruction_metrics

    model = load_model("tiny-gemma3", device="cpu")
    texts = ["The capital of France is Paris.", "Mount Fuji is in Japan.", "Hamlet was written by Shakespeare."]
    hin, hout = "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"
    acts = harvest_activations(model, texts, [hin, hout], context_size=16, progress=False)
    d = model.cfg.d_model
    sae = create_sae(SAEConfig(d_in=d, architecture="jumprelu", transcoder=True, skip=True,
                               metadata={"hook_name": hin, "hook_name_out": hout}), seed=0).eval()
    x, y = acts[hin].float(), acts[hout].float()
    with torch.no_grad():  # skip = least-squares map x -> y: a large, known share of the variance
        sae.W_skip.copy_(torch.linalg.lstsq(x, y).solution.T)
        sae.set_threshold(torch.full((sae.cfg.d_sae,), 1e3))  # no feature fires: the reconstruction is skip + b_dec
    with torch.no_grad():
        ev_fwd = explained_variance(y, sae(x).recon)
        ev_no_skip = explained_variance(y, sae.decode(sae.encode(x)))
    assert ev_fwd > ev_no_skip + 0.2
    assert reconstruction_metrics(sae, x, y)["explained_variance"] == pytest.approx(ev_fwd, abs=1e-5)
    m = evaluate_sae(model, sae, hin, texts, n_tokens=10_000, context_size=16, hook_name_out=hout)
    assert m["n_tokens"] == x.shape[0]
    assert m["explained_variance"] == pytest.approx(ev_fwd, abs=1e-4)
