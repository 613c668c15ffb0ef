"""Attention knockout: against an independent oracle (masking each prompt separately) and its definition."""
import numpy as np
import pytest
import torch

from circuit_discovery.facts import build_pairs, load_builtin
from circuit_discovery.metrics import batch_from_pairs, logit_diff
from circuit_discovery.validation.knockouts import attention_knockout_drop, attention_knockout_halves


@pytest.fixture(scope="module")
def setup(tiny_models):
    m = tiny_models["tiny-llama"]
    facts = load_builtin()["capital_city"][:4]
    return m, build_pairs(facts, m.tokenizer, seed=0)


def test_knockout_matches_per_prompt_oracle(setup):
    m, pairs = setup
    drops = attention_knockout_drop(m, pairs, layers=[1, 2])
    for i, p in enumerate(pairs):  # oracle: one prompt at a time, mask built by hand
        b = batch_from_pairs(m, [p])
        n = b.tokens.shape[1]
        block = torch.zeros(1, n, n, dtype=torch.bool)
        block[0, n - 1, p.subject_span[0]:p.subject_span[1]] = True
        with torch.no_grad():
            clean = logit_diff(m, m.final_hidden(b.tokens, b.mask), b)
            with m.block_attention([1, 2], block):
                ko = logit_diff(m, m.final_hidden(b.tokens, b.mask), b)
        assert abs(float(clean - ko) - drops[i]) < 1e-4
    assert np.abs(drops).sum() > 0


def test_no_layers_no_drop_and_halves(setup):
    m, pairs = setup
    assert np.allclose(attention_knockout_drop(m, pairs, layers=[]), 0, atol=1e-6)
    h = attention_knockout_halves(m, pairs)
    assert h["attn_block_drop_upper"].shape == h["attn_block_drop_lower"].shape == (len(pairs),)
