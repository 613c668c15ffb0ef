"""SAE pipeline on the real built-in Gemma 3 270M (slow; run with -m integration).

Uses the built-in corpus (sampled once and cached, see ``docs/sae.md``; the first run builds it, which takes
minutes). The quality test trains a smaller budget than the default so that it stays near 90 s on 2 cores:
``HARVEST`` unique tokens, ``TOKENS`` training tokens (the default is 100k), evaluated on 512 held-out tokens.
At that budget it asserts a weaker bound than the issue's bar (EV >= 0.80, CE score >= 0.85, dead <= 0.10,
L0 <= 64, met at the default budget of 100k tokens by ``benchmarks/sae.py --quick``): EV >= 0.50,
CE score >= 0.75, dead <= 0.20, L0 <= 64 (measured at this budget: EV 0.60, CE score 0.84, dead 0.087).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

HARVEST, TOKENS = 8_192, 30_720


@pytest.fixture(scope="module")
def model():
    from circuit_discovery.models import load_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster than 2 threads on a shared 2-core machine
    yield load_model()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(model):
    from circuit_discovery.sae import build_corpus

    return build_corpus(model)


def test_harvest_excludes_bos_and_matches_cache(model):
    from circuit_discovery.sae import harvest_activations

    texts = ["The capital of France is Paris.", "Mount Fuji is in Japan."]
    hook = "blocks.9.hook_resid_post"
    acts = harvest_activations(model, texts, [hook])[hook]
    tokens, mask = model.tokenize(texts)
    _, cache = model.run_with_cache(tokens, names=[hook], attention_mask=mask, return_logits=False)
    keep = mask.bool() & (tokens != model.cfg.bos_token_id)
    # packed: the second text follows the first after a BOS separator, so compare the first text exactly
    n0 = int(keep[0].sum())
    torch.testing.assert_close(acts[:n0], cache[hook][0][keep[0]].float(), atol=1e-3, rtol=1e-3)  # |x| ~ 100s
    assert acts.shape[0] == int(keep.sum())
    # BOS residual norms are outliers; none of them may leak into the training rows
    assert acts.norm(dim=-1).max() < cache[hook][:, 0].norm(dim=-1).min()


def test_quality_middle_layer_small_budget(model, corpus):
    from circuit_discovery.sae import SAETrainConfig, evaluate_sae, harvest_activations, split_heldout, train_saes

    train, held = split_heldout(corpus.texts, 0.1)
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    acts = harvest_activations(model, train, [hook], max_tokens=HARVEST)
    cfg = SAETrainConfig(hook, training_tokens=TOKENS, dead_feature_window=8_192)
    r = train_saes(acts, [cfg], progress=False)[hook]
    m = evaluate_sae(model, r.sae, hook, held, n_tokens=512)
    assert m["l0"] <= 64, m
    assert m["explained_variance"] >= 0.50, m
    assert m["ce_loss_score"] >= 0.75, m
    assert m["dead_fraction"] <= 0.20, m
