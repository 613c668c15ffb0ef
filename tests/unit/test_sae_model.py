"""Harvesting, evaluation, labels, corpus and the SAE cache on the tiny random Gemma 3 (no download)."""
from __future__ import annotations

import pytest
import torch

from circuit_discovery.errors import InputError
from circuit_discovery.sae import (
    SAEConfig,
    SAETrainConfig,
    SparseAutoencoder,
    create_sae,
    evaluate_sae,
    harvest_activations,
    label_features,
    model_sampled_texts,
    stream_activations,
    train_saes_on_model,
)
from circuit_discovery.sae.corpus import build_corpus, builtin_fact_sentences, split_heldout
from circuit_discovery.sae.harvest import iter_token_batches
from circuit_discovery.sae.labels import feature_logit_effects, top_activating_contexts

TEXTS = [
    "The capital of France is Paris.",
    "The capital of Germany is Berlin. The capital of Italy is Rome.",
    "Mount Fuji is in Japan.",
    "Hamlet was written by Shakespeare.",
    "People in Spain speak Spanish. The currency of Japan is the yen.",
    "Albert Einstein was a physicist.",
]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"]




@pytest.fixture(scope="module")
def model():
    from circuit_discovery.models import load_model

    return load_model("tiny-gemma3", device="cpu")


def identity_sae(d: int, hook: str) -> SparseAutoencoder:
    """Exact reconstruction: feats = [relu(x), relu(-x)], recon = relu(x) - relu(-x) = x."""
    sae = create_sae(SAEConfig(d_in=d, d_sae=2 * d, metadata={"hook_name": hook}))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_harvest_matches_run_with_cache_and_drops_bos_and_pad(model):
    acts = harvest_activations(model, TEXTS, HOOKS, context_size=16, model_batch_size=4)
    ref = {h: [] for h in HOOKS}
    n_real = 0
    for tokens, mask in iter_token_batches(model, TEXTS, context_size=16, batch_size=4):
        _, cache = model.run_with_cache(tokens, names=HOOKS, attention_mask=mask)
        keep = mask.bool() & (tokens != model.cfg.bos_token_id)
        n_real += int(keep.sum())
        for h in HOOKS:
            ref[h].append(cache[h][keep])
    for h in HOOKS:
        assert acts[h].shape == (n_real, model.cfg.d_model)
        torch.testing.assert_close(acts[h], torch.cat(ref[h]), atol=1e-5, rtol=1e-5)
    # every token of every text is harvested exactly once (packing neither drops nor repeats tokens)
    assert n_real == sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    capped = harvest_activations(model, TEXTS, HOOKS[:1], max_tokens=10, context_size=16)
    assert capped[HOOKS[0]].shape[0] == 10


def test_packing_fills_rows_with_bos_separators(model):
    bos = model.cfg.bos_token_id
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # oracle: the documents joined by one BOS each, cut into rows of 15 tokens, each row prefixed by BOS
    stream = ids[0] + [t for doc in ids[1:] for t in [bos] + doc]
    expected = [[bos] + stream[s : s + 15] for s in range(0, len(stream), 15)]
    batches = list(iter_token_batches(model, TEXTS, context_size=16, batch_size=3))
    assert all(toks.shape[0] <= 3 for toks, _ in batches)
    rows = [r[m.bool()].tolist() for toks, mask in batches for r, m in zip(toks, mask)]
    assert rows == expected
    assert all(len(r) == 16 for r in rows[:-1])
    unpacked = list(iter_token_batches(model, TEXTS, context_size=64, batch_size=64, pack=False))
    toks, mask = unpacked[0]
    assert toks.shape[0] == len(TEXTS)  # short texts: one per row
    assert [r[m.bool()].tolist() for r, m in zip(toks, mask)] == [[bos] + d for d in ids]


def test_long_texts_are_split_with_bos_per_row(model):
    rows = list(iter_token_batches(model, ["word " * 100], context_size=16, batch_size=64))
    tokens, mask = rows[0]
    assert tokens.shape[1] <= 16 and tokens.shape[0] > 1
    assert (tokens[:, 0] == model.cfg.bos_token_id).all()


def test_stream_is_a_bounded_shuffle_of_the_harvest(model):
    acts = harvest_activations(model, TEXTS, HOOKS[:2], context_size=16)
    n = acts[HOOKS[0]].shape[0]
    batches = list(stream_activations(model, TEXTS, HOOKS[:2], batch_size=8, buffer_tokens=32, context_size=16, seed=1))
    assert all(b[HOOKS[0]].shape[0] == 8 for b in batches[:-1])
    got = {h: torch.cat([b[h] for b in batches]) for h in HOOKS[:2]}
    assert got[HOOKS[0]].shape[0] == n
    assert not torch.equal(got[HOOKS[0]], acts[HOOKS[0]])  # shuffled
    # rows of the two hooks stay paired: sort both by the first hook's rows
    def key(t):
        return torch.tensor([hash(tuple(r.tolist())) for r in t])
    a_order, g_order = key(acts[HOOKS[0]]).argsort(), key(got[HOOKS[0]]).argsort()
    for h in HOOKS[:2]:
        torch.testing.assert_close(got[h][g_order], acts[h][a_order])


def test_evaluate_perfect_and_zero_sae(model):
    hook = "blocks.1.hook_resid_post"
    d = model.cfg.d_model
    perfect = evaluate_sae(model, identity_sae(d, hook), hook, TEXTS, n_tokens=10_000, context_size=16)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["cossim"] == pytest.approx(1.0, abs=1e-5)
    # clean CE recomputed independently from full logits
    nll, n = 0.0, 0
    for tokens, mask in iter_token_batches(model, TEXTS, 16, 2):
        with torch.no_grad():
            logp = model(tokens, attention_mask=mask)[:, :-1].log_softmax(-1)
        valid = (mask.bool() & (tokens != model.cfg.bos_token_id))[:, 1:]  # targets: real tokens, not separators
        nll += float(-logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)[valid].sum())
        n += int(valid.sum())
    assert perfect["ce_clean"] == pytest.approx(nll / n, rel=1e-5)
    zero = identity_sae(d, hook)
    with torch.no_grad():
        zero.W_dec.zero_()
    z = evaluate_sae(model, zero, hook, TEXTS, n_tokens=10_000, context_size=16)
    assert z["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert z["ce_spliced"] == pytest.approx(z["ce_zero_ablated"], rel=1e-6)
    assert z["ce_zero_ablated"] != pytest.approx(z["ce_clean"])


def test_evaluate_transcoder_zero_output_equals_ablation(model):
    d = model.cfg.d_model
    tc = create_sae(SAEConfig(d_in=d, transcoder=True, metadata={"hook_name_out": "blocks.2.hook_mlp_out"}), seed=0)
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.zero_()
    r = evaluate_sae(model, tc, "blocks.2.mlp.hook_in", TEXTS, context_size=16)
    assert r["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert r["n_tokens"] == r["dead_fraction_n_tokens"] > 0
    # sparsity over more tokens reads the transcoder's input hook (the normalised residual), not its output
    r2 = evaluate_sae(model, tc, "blocks.2.mlp.hook_in", TEXTS, n_tokens=8, context_size=16,
                      sparsity_tokens=10_000)
    x = harvest_activations(model, TEXTS, ["blocks.2.mlp.hook_in"], context_size=16)
    with torch.no_grad():
        f = tc.encode(x["blocks.2.mlp.hook_in"])
    assert r2["n_tokens"] == 8 and r2["dead_fraction_n_tokens"] == f.shape[0] == r["n_tokens"]
    assert r2["l0"] == pytest.approx(float((f != 0).sum(-1).float().mean()))


def test_evaluate_sparsity_over_more_tokens(model):
    """l0 and dead_fraction over every held-out token (brute force from harvested activations) while the
    reconstruction and CE metrics stay those of the first n_tokens."""
    hook = "blocks.1.hook_resid_post"
    sae = create_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=64, architecture="topk", k=2), seed=3)
    short = evaluate_sae(model, sae, hook, TEXTS, n_tokens=12, context_size=16)
    both = evaluate_sae(model, sae, hook, TEXTS, n_tokens=12, context_size=16, sparsity_tokens=10_000)
    acts = harvest_activations(model, TEXTS, [hook], context_size=16)[hook]
    with torch.no_grad():
        f = sae.encode(acts)
    assert short["dead_fraction_n_tokens"] == short["n_tokens"] == both["n_tokens"] == 12
    assert both["dead_fraction_n_tokens"] == acts.shape[0] > 12
    assert both["dead_fraction"] == pytest.approx(float(((f != 0).sum(0) == 0).float().mean()))
    assert both["l0"] == pytest.approx(float((f != 0).sum(-1).float().mean()))
    assert both["dead_fraction"] < short["dead_fraction"]
    for k in ("explained_variance", "ce_loss_score", "kl_div_score", "mse"):
        assert both[k] == short[k]


def test_labels_top_contexts_and_logit_effects(model):
    hook = "blocks.1.hook_resid_post"
    sae = identity_sae(model.cfg.d_model, hook)
    acts = harvest_activations(model, TEXTS, [hook], context_size=16)[hook]
    ctxs, fires, n = top_activating_contexts(model, sae, hook, TEXTS, features=[0, 5], k=3, context_size=16)
    assert n == acts.shape[0]
    for f in (0, 5):
        brute = torch.relu(acts[:, f]).sort(descending=True).values[:3]
        got = torch.tensor([c["activation"] for c in ctxs[f]])
        torch.testing.assert_close(got, brute[: len(got)], atol=1e-5, rtol=1e-5)
        assert all("«" in c["text"] and "»" in c["text"] for c in ctxs[f])
        assert int(fires[f]) == int((acts[:, f] > 0).sum())
    eff = feature_logit_effects(model, sae, [3], top_n=4)
    direct = model.unembed(model.final_norm(sae.W_dec[3]))
    top = direct.topk(4).indices.tolist()
    assert [t for t, _ in eff[3][0]] == [model.tokenizer.decode([i]) for i in top]
    labels = label_features(model, sae, hook, TEXTS, features=[0, 1], k=3)
    assert labels[0].label.startswith("on ") and "→" in labels[0].label
    assert 0 <= labels[1].density <= 1


def test_sampler_truncation_matches_nucleus_by_hand():
    from scipy.stats import chisquare

    from circuit_discovery.sae.corpus import _sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    # top-p 0.9 keeps {0, 1, 2} (mass before token 2 is 0.8 < 0.9; before token 3 it is 0.95); renormalised
    expected = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([_sample_next(logits.expand(2000, 4), g, 1.0, 0, 0.9) for _ in range(5)]).flatten()
    counts = torch.bincount(draws, minlength=4)
    assert counts[3] == 0
    obs = counts[:3].double().numpy()
    exp = expected.double().numpy()
    assert chisquare(obs, exp / exp.sum() * obs.sum()).pvalue > 1e-3
    # top-k 2 keeps {0, 1} only; temperature -> 0 is greedy
    assert set(_sample_next(logits.expand(500, 4), g, 1.0, 2, 1.0).tolist()) == {0, 1}
    assert set(_sample_next(logits.expand(50, 4), g, 1e-4, 0, 1.0).tolist()) == {0}


def test_kv_cache_sampler_equals_full_recompute(model):
    from circuit_discovery.sae.corpus import _sample_next, sample_token_batch

    rows = sample_token_batch(model, 3, 6, torch.Generator().manual_seed(4), top_k=50, top_p=0.9)
    # oracle: recompute the logits of the whole prefix at every step (no cache), same generator stream
    g = torch.Generator().manual_seed(4)
    toks = torch.full((3, 1), model.cfg.bos_token_id)
    for _ in range(6):
        with torch.no_grad():
            nxt = _sample_next(model(toks)[:, -1], g, 1.0, 50, 0.9)
        toks = torch.cat([toks, nxt[:, None]], 1)
    eos = model.tokenizer.eos_token_id
    ref = [r[: r.index(eos)] if eos in r else r for r in toks[:, 1:].tolist()]
    assert rows == ref


def test_corpus_sampling_is_cached_and_deterministic(model, tmp_path, monkeypatch):
    import circuit_discovery.sae.corpus as corpus_mod

    a = model_sampled_texts(model, n_sequences=3, max_new_tokens=6, seed=0, batch_size=2, cache_dir=tmp_path)
    assert len(a) == 3 and all(isinstance(t, str) for t in a)

    def boom(*args, **kwargs):
        raise AssertionError("sampling must not run on a cache hit")

    monkeypatch.setattr(corpus_mod, "sample_token_batch", boom)
    assert model_sampled_texts(model, n_sequences=3, max_new_tokens=6, seed=0, batch_size=2, cache_dir=tmp_path) == a
    c = build_corpus(model, fact_prompts=TEXTS, n_sequences=3, max_new_tokens=6, batch_size=2, cache_dir=tmp_path)
    monkeypatch.undo()
    b = model_sampled_texts(model, n_sequences=3, max_new_tokens=6, seed=0, batch_size=2, cache_dir=tmp_path / "x")
    assert a == b
    facts = builtin_fact_sentences()
    assert len(facts) > 100 and "The Eiffel Tower is located in the city of Paris." in facts
    assert c.texts[-len(TEXTS):] == TEXTS and c.texts[len(a) : len(a) + len(facts)] == facts and c.n_tokens > 0
    tr, ho = split_heldout(c.texts, 0.25)
    assert sorted(tr + ho) == sorted(c.texts) and len(ho) == round(0.25 * len(c.texts))
    with pytest.raises(InputError):
        model_sampled_texts(model, n_sequences=0)


def test_larger_corpus_starts_from_smaller_cached_run(model, tmp_path, monkeypatch):
    import circuit_discovery.sae.corpus as corpus_mod

    small = model_sampled_texts(model, n_sequences=5, max_new_tokens=6, seed=1, batch_size=2, cache_dir=tmp_path)
    fresh = model_sampled_texts(model, n_sequences=8, max_new_tokens=6, seed=1, batch_size=2, cache_dir=tmp_path / "x")
    calls = []
    real = corpus_mod.sample_token_batch
    monkeypatch.setattr(corpus_mod, "sample_token_batch", lambda m, n, *a: calls.append(n) or real(m, n, *a))
    grown = model_sampled_texts(model, n_sequences=8, max_new_tokens=6, seed=1, batch_size=2, cache_dir=tmp_path)
    # batches 0 and 1 come from the 5-sequence run; its partial third batch is sampled again, then batch 3
    assert grown == fresh and grown[:4] == small[:4] and calls == [2, 2]
    other_seed = model_sampled_texts(model, n_sequences=2, max_new_tokens=6, seed=2, batch_size=2, cache_dir=tmp_path)
    assert calls == [2, 2, 2] and other_seed != small[:2]
    # a smaller corpus is taken whole from the larger run, and cached under its own settings
    assert model_sampled_texts(model, n_sequences=4, max_new_tokens=6, seed=1, batch_size=2,
                               cache_dir=tmp_path / "x") == fresh[:4]
    assert calls == [2, 2, 2] and len(list((tmp_path / "x").rglob("sampled_*.json"))) == 2


def test_train_on_model_uses_cache(model, tmp_path):
    cfgs = [SAETrainConfig("blocks.1.hook_resid_post", training_tokens=256, train_batch_size_tokens=64),
            SAETrainConfig("blocks.2.mlp.hook_in", hook_name_out="blocks.2.hook_mlp_out",
                           training_tokens=256, train_batch_size_tokens=64)]
    texts = TEXTS * 4
    first = train_saes_on_model(model, texts, cfgs, corpus_id="c1", cache_dir=tmp_path, context_size=16,
                                progress=False)
    assert first["blocks.1.hook_resid_post"].sae.cfg.metadata["model_name"] == "tiny-gemma3"
    again = train_saes_on_model(model, texts, cfgs, corpus_id="c1", cache_dir=tmp_path, context_size=16,
                                progress=False)
    for k, r in first.items():
        assert isinstance(again[k], SparseAutoencoder)
        torch.testing.assert_close(again[k].W_dec, r.sae.W_dec)
    assert again["blocks.2.mlp.hook_in->blocks.2.hook_mlp_out"].cfg.transcoder


def test_transcoder_metrics_are_cached_with_the_transcoders(model, tmp_path, monkeypatch):
    """A second train_transcoders call reuses the transcoders and their held-out metrics from the cache: no
    evaluation runs again (a warm pipeline run spends no time there), and the metrics are the same."""
    import circuit_discovery.sae.dictionaries as dictionaries

    kw = dict(layers=[0, 1], training_tokens=1024, n_sequences=4, evaluate=True, eval_tokens=32, progress=False,
              cache_dir=tmp_path / "saes", corpus_cache_dir=tmp_path)
    first = dictionaries.train_transcoders(model, **kw)
    assert first.trained == [0, 1] and set(first.metrics) == {0, 1}
    assert 0 < first.metrics[0]["n_tokens"] <= 32

    def boom(*a, **k):
        raise AssertionError("evaluate_sae ran again on a warm cache")

    monkeypatch.setattr("circuit_discovery.sae.evaluate.evaluate_sae", boom)
    second = dictionaries.train_transcoders(model, **kw)
    assert second.trained == [] and second.metrics == first.metrics
    with pytest.raises(AssertionError, match="warm cache"):  # other eval settings are measured again
        dictionaries.train_transcoders(model, **{**kw, "eval_tokens": 16})


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gpt2"])
def test_chunked_next_token_losses_equal_the_full_logits(name):
    """next_token_losses (logits LOSS_CHUNK positions at a time, from final hidden states) against the oracle: full
    logits of every position, log-softmax, gathered NLL and KL over the same positions (tolerance 1e-5 relative;
    float32 sums in a different order). tiny-gemma2 soft-caps its logits. A perturbed run differs (the check can
    fail)."""
    from circuit_discovery.models import load_model
    from circuit_discovery.sae.evaluate import next_token_losses

    model = load_model(name, device="cpu")
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 5:] = False
    h = model.final_hidden(tokens, attention_mask=mask)
    h2 = h + 0.3 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    nll, kl, n = next_token_losses(model, {"a": h, "b": h2}, tokens, valid, reference="a", chunk=3)
    lp_a = model(tokens, attention_mask=mask)[:, :-1].float().log_softmax(-1)
    lp_b = model.unembed(h2)[:, :-1].float().log_softmax(-1)
    tgt = tokens[:, 1:, None]
    ref_nll = {k: float(-lp.gather(-1, tgt).squeeze(-1)[valid].sum()) for k, lp in (("a", lp_a), ("b", lp_b))}
    ref_kl = float((lp_a.exp() * (lp_a - lp_b)).sum(-1)[valid].sum())
    assert n == int(valid.sum()) == 13
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert kl == {"b": pytest.approx(ref_kl, rel=1e-5)}
    assert ref_kl > 1e-3 and abs(ref_nll["a"] - ref_nll["b"]) > 1e-3
