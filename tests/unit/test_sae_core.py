"""SAE architectures, training, I/O and metric formulas on synthetic data (no language model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import minimize

from circuit_discovery.sae import (
    SAE_REGISTRY,
    SAEConfig,
    SAETrainConfig,
    SparseAutoencoder,
    ce_loss_score,
    cossim,
    create_sae,
    dead_fraction,
    explained_variance,
    geometric_median,
    kl_div_score,
    l0,
    load_sae,
    mse,
    reconstruction_metrics,
    register_sae,
    sae_cache_key,
    save_sae,
    train_saes,
)
from circuit_discovery.sae.io import load_cached_sae, save_cached_sae


def sparse_data(n=40_000, d=16, m=32, p=0.05, seed=0, offset=0.3):
    """x = codes @ D + offset with known unit-norm dictionary D [m, d] and sparse non-negative codes."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D = D / D.norm(dim=-1, keepdim=True)
    codes = (torch.rand(n, m, generator=g) < p).float() * (torch.rand(n, m, generator=g) * 2 + 0.5)
    return codes @ D + offset, D, codes


def _small_cfg(**kw):
    base = dict(hook_name="h", architecture="standard", expansion_factor=4, training_tokens=20_480,
                train_batch_size_tokens=512,
                lr=3e-3, l1_coefficient=1.0, dead_feature_window=5_000, log_every=1)
    base.update(kw)
    return SAETrainConfig(**base)


# ------------------------------------------------------------------------------ architectures
def test_registry_and_decorator():
    assert {"standard", "topk", "jumprelu"} <= set(SAE_REGISTRY)

    @register_sae("test_identity_relu")
    class _Tmp(SparseAutoencoder):
        def activation(self, pre):
            return torch.relu(pre)

    try:
        sae = create_sae(SAEConfig(d_in=4, architecture="test_identity_relu"))
        assert isinstance(sae, _Tmp) and sae.cfg.d_sae == 16
    finally:
        SAE_REGISTRY.pop("test_identity_relu")
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAEConfig(d_in=4, architecture="nope")
    with pytest.raises(ValueError, match="k"):
        SAEConfig(d_in=4, architecture="topk", k=100)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_shapes_and_saelens_parameter_names(arch):
    cfg = SAEConfig(d_in=8, architecture=arch, k=3)
    sae = create_sae(cfg, seed=0)
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)
    x = torch.randn(2, 5, 8)
    out = sae(x)
    assert out.recon.shape == (2, 5, 8) and out.feats.shape == (2, 5, 32)
    assert torch.allclose(out.recon, sae.decode(sae.encode(x)))
    assert (out.feats >= 0).all()


def test_topk_keeps_exactly_k_largest():
    sae = create_sae(SAEConfig(d_in=6, architecture="topk", k=4), seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # make all pre-activations positive
    x = torch.randn(10, 6)
    f = sae.encode(x)
    pre = sae.hidden_pre(x)
    assert ((f > 0).sum(-1) == 4).all()
    brute = torch.zeros_like(pre)
    for i in range(pre.shape[0]):
        idx = np.argsort(-pre[i].detach().numpy())[:4]
        brute[i, idx] = pre[i, idx]
    assert torch.allclose(f, brute)


def test_jumprelu_threshold():
    sae = create_sae(SAEConfig(d_in=4, architecture="jumprelu"), seed=0).eval()
    pre = sae.hidden_pre(torch.randn(20, 4))
    thr = sae.threshold
    assert torch.equal(sae.activation(pre), pre * (pre > thr))


def test_geometric_median_minimises_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(50, 3, generator=g, dtype=torch.float64)
    pts[:5] += 20  # outliers pull the mean, not the median
    gm = geometric_median(pts).numpy()
    ref = minimize(lambda y: np.linalg.norm(pts.numpy() - y, axis=1).sum(), pts.mean(0).numpy(), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000}).x
    np.testing.assert_allclose(gm, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_fold_scaling_factor_equivalence(arch):
    sae = create_sae(SAEConfig(d_in=8, architecture=arch, k=5), seed=3).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(30, 8) * 7
    s = 0.37
    ref_f = sae.encode(x * s)
    ref_recon = sae.decode(ref_f) / s
    sae.fold_activation_norm_scaling_factor(s)
    assert torch.allclose(sae.encode(x), ref_f, atol=1e-5)
    assert torch.allclose(sae(x).recon, ref_recon, atol=1e-4)


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_recovers_known_sparse_dictionary(arch):
    x, D, _ = sparse_data(n=40_000)
    cfg = _small_cfg(architecture=arch, k=3, training_tokens=120_000)
    r = train_saes({"h": x}, [cfg], progress=False)["h"]
    W = r.sae.W_dec.detach()
    W = W / W.norm(dim=-1, keepdim=True)
    best = (D @ W.T).max(-1).values  # for each true feature, the closest learned direction
    # random directions in 16-d reach max-cosine ~0.6; a recovered dictionary is close to every true atom
    assert best.mean() > 0.9 and (best > 0.75).all(), best
    m = reconstruction_metrics(r.sae, x[:5000])
    assert m["explained_variance"] > 0.8
    assert m["l0"] < 12  # true L0 is 32 * 0.05 = 1.6


def test_transcoder_learns_sparse_map():
    g = torch.Generator().manual_seed(5)
    _, A, codes = sparse_data(n=30_000, d=12, m=24, seed=1, offset=0.0)
    B = torch.randn(24, 10, generator=g)
    x, y = codes @ A, codes @ B + 1.0
    cfg = _small_cfg(hook_name="in", hook_name_out="out", training_tokens=90_000)
    r = train_saes({"in": x, "out": y}, [cfg], progress=False)["in->out"]
    assert r.sae.cfg.transcoder and r.sae.W_dec.shape == (48, 10) and not r.sae.cfg.apply_b_dec_to_input
    m = reconstruction_metrics(r.sae, x[:5000], y[:5000])
    # oracle: the best affine map x -> y (least squares) explains ~0.41; the sparse code explains far more
    X = torch.cat([x, torch.ones(len(x), 1)], 1)
    linear_ev = explained_variance(y, X @ torch.linalg.lstsq(X, y).solution)
    assert m["explained_variance"] > max(0.7, linear_ev + 0.2), (m, linear_ev)


def test_deterministic_for_seed():
    x, _, _ = sparse_data(n=8_000)
    a = train_saes({"h": x}, [_small_cfg()], progress=False)["h"]
    b = train_saes({"h": x}, [_small_cfg()], progress=False)["h"]
    c = train_saes({"h": x}, [_small_cfg(seed=7)], progress=False)["h"]
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a.sae, n), getattr(b.sae, n))
    assert not torch.equal(a.sae.W_dec, c.sae.W_dec)
    assert a.history == b.history


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_resume_equals_uninterrupted(tmp_path, arch):
    x, _, _ = sparse_data(n=6_000)
    y = x @ torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    cfgs = [_small_cfg(architecture=arch, k=4, checkpoint_every=7),
            _small_cfg(architecture=arch, k=4, hook_name_out="y", checkpoint_every=7)]
    src = {"h": x, "y": y}
    full = train_saes(src, cfgs, progress=False)
    ck = tmp_path / "ck"
    train_saes(src, cfgs, checkpoint_dir=ck, progress=False, stop_after_steps=17)
    assert json.loads((ck / "latest.json").read_text())["step"] == 17
    resumed = train_saes(src, cfgs, checkpoint_dir=ck, progress=False)
    for key in full:
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(full[key].sae, n), getattr(resumed[key].sae, n)), (key, n)
        assert full[key].history == resumed[key].history
    with pytest.raises(ValueError, match="different configs"):
        train_saes(src, [_small_cfg(lr=1e-3)], checkpoint_dir=ck, progress=False)


def test_streaming_source_matches_rebatched_rows():
    x, _, _ = sparse_data(n=3_000)
    chunks = [{"h": x[i : i + 300]} for i in range(0, 3_000, 300)]
    cfg = _small_cfg(training_tokens=2_560, train_batch_size_tokens=512)
    r = train_saes(iter(chunks), [cfg], progress=False)["h"]
    assert r.n_tokens == 2_560
    with pytest.raises(ValueError, match="ended"):
        train_saes(iter(chunks[:2]), [cfg], progress=False)


def test_bad_inputs():
    with pytest.raises(KeyError):
        train_saes({"other": torch.randn(1000, 4)}, [_small_cfg()], progress=False)
    with pytest.raises(ValueError):
        SAETrainConfig("h", training_tokens=10, train_batch_size_tokens=100)
    sae = create_sae(SAEConfig(d_in=4))
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.randn(3, 5))


# ------------------------------------------------------------------------------ io
@pytest.mark.parametrize("arch,transcoder", [("standard", False), ("topk", False), ("jumprelu", False),
                                             ("standard", True), ("jumprelu", True)])
def test_save_load_round_trip(tmp_path, arch, transcoder):
    cfg = SAEConfig(d_in=6, d_out=5 if transcoder else None, transcoder=transcoder, architecture=arch, k=3,
                    metadata={"model_name": "m", "hook_name": "blocks.2.hook_resid_post", "context_size": 64,
                              **({"hook_name_out": "blocks.2.hook_mlp_out"} if transcoder else {})})
    sae = create_sae(cfg, seed=0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    save_sae(sae, tmp_path / "s")
    d = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "metadata"):
        assert key in d
    assert d["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and d["metadata"]["hook_layer"] == 2
    tensors = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert tensors["W_enc"].shape == (6, 24) and tensors["W_dec"].shape == (24, cfg.d_out)
    if arch == "topk":
        assert d["k"] == 3 and d["architecture"] == "topk"
    if arch == "jumprelu":
        assert "threshold" in tensors
    if transcoder:
        assert d["architecture"] == {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}[arch]
        assert d["d_out"] == 5 and d["hook_name_out"] == "blocks.2.hook_mlp_out"
    back = load_sae(tmp_path / "s")
    x = torch.randn(7, 6)
    assert torch.allclose(back(x).recon, sae.eval()(x).recon, atol=1e-6)
    # SAELens-only cfg (no circuit_discovery block) loads too
    del d["circuit_discovery"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(d))
    back2 = load_sae(tmp_path / "s")
    assert torch.allclose(back2(x).recon, sae(x).recon, atol=1e-6)


def test_load_rejects_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path)
    sae = create_sae(SAEConfig(d_in=4))
    save_sae(sae, tmp_path / "s")
    d = json.loads((tmp_path / "s" / "cfg.json").read_text())
    d["circuit_discovery"]["config"]["d_sae"] = 99
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="shape"):
        load_sae(tmp_path / "s")


def test_cache_key_and_cache(tmp_path):
    c1, c2 = SAETrainConfig("h"), SAETrainConfig("h", lr=2e-3)
    k1 = sae_cache_key("m", "h", c1, "corpus")
    assert k1 == sae_cache_key("m", "h", SAETrainConfig("h"), "corpus")
    assert len({k1, sae_cache_key("m", "h", c2, "corpus"), sae_cache_key("m", "h2", c1, "corpus"),
                sae_cache_key("m2", "h", c1, "corpus"), sae_cache_key("m", "h", c1, "other")}) == 5
    assert load_cached_sae(tmp_path, k1) is None
    sae = create_sae(SAEConfig(d_in=4), seed=0)
    save_cached_sae(tmp_path, k1, sae, extra={"a": 1})
    got = load_cached_sae(tmp_path, k1)
    assert torch.equal(got.W_enc, sae.W_enc)


# ------------------------------------------------------------------------------ metric formulas
def test_metric_formulas_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    r = torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0], [1.0, 0.0]])
    # mean = (1, 0.5); total SS = (0+.25)+(1+.25)+(0+.25)+(1+.25) = 3; residual SS = 0.25 + 1 = 1.25
    assert explained_variance(x, r) == pytest.approx(1 - 1.25 / 3)
    assert mse(x, r) == pytest.approx(1.25 / 8)
    assert cossim(x, r) == pytest.approx((1 + 1 + 1 + 1) / 4)
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == pytest.approx(1.5)
    assert dead_fraction(torch.tensor([0, 3, 0, 1])) == pytest.approx(0.5)
    assert ce_loss_score(ce_clean=2.0, ce_spliced=2.5, ce_zero_ablated=7.0) == pytest.approx(0.9)
    assert kl_div_score(kl_spliced=0.1, kl_zero_ablated=2.0) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        explained_variance(torch.ones(3, 2), torch.zeros(3, 2))


def test_reconstruction_metrics_dead_fraction():
    sae = create_sae(SAEConfig(d_in=3, d_sae=6), seed=0)
    with torch.no_grad():  # only latents 0..2 can fire (relu(x_i)); 3..5 have large negative bias
        sae.W_enc.zero_()
        sae.W_enc[:, :3] = torch.eye(3)
        sae.b_enc[3:] = -100.0
        sae.W_dec.zero_()
        sae.W_dec[:3] = torch.eye(3)
    x = torch.rand(50, 3) + 0.1
    m = reconstruction_metrics(sae, x)
    assert m["dead_fraction"] == pytest.approx(0.5) and m["dead_fraction_n_tokens"] == 50
    assert m["explained_variance"] == pytest.approx(1.0) and m["l0"] == pytest.approx(3.0)


def test_plot_layer_metrics_is_the_report_figure(tmp_path):
    from circuit_discovery.report.figures import sae_metrics_per_layer
    from circuit_discovery.sae import plot_layer_metrics

    layers = {f"blocks.{l}.hook_resid_pre": {"explained_variance": 0.8, "ce_loss_score": 0.9, "dead_fraction": 0.0,
                                             "l0": 10.0 + l} for l in (1, 0)}
    plot_layer_metrics(layers, str(tmp_path / "a.png"), title="t")
    sae_metrics_per_layer(layers, tmp_path / "b.png", title="t")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
