"""ROME's corruption noise in causal tracing: sigma = 3 x the std of the *subject tokens'* embeddings of the traced
dataset (not of the whole vocabulary), >= 10 samples by default, noise on subject positions only, seeded."""
import inspect

import numpy as np
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution import PairInputs, embedding_std, subject_embedding_std
from circuit_discovery.attribution.causal_tracing import answer_prob, causal_tracing, subject_noise
from circuit_discovery.errors import InputError
from circuit_discovery.facts import Fact, build_pairs
from circuit_discovery.metrics import make_batch

SUBJECTS = [("France", " Paris"), ("Japan", " Tokyo"), ("Italy", " Rome")]


@pytest.fixture(scope="module")
def m64():
    m = load_model("tiny-gemma3", device="cpu", dtype="float64")
    return m


@pytest.fixture(scope="module")
def pairs(m64):
    facts = [Fact("capital", s, f"The capital of {s} is", a, template="The capital of {} is") for s, a in SUBJECTS]
    return build_pairs(facts, m64.tokenizer)


def _brute_subject_std(model, pairs):
    """Each subject token embedded on its own through hook_embed, all values pooled (ROME's collect_embedding_std)."""
    rows = []
    for p in pairs:
        s, e = p.subject_span
        for t in p.clean_tokens[s:e]:
            cache = {}
            with torch.no_grad(), model.hooks([("hook_embed", lambda x, name: cache.setdefault("e", x.detach()))]):
                model.final_hidden(torch.tensor([[t]]))
            rows.append(cache["e"][0, 0].double())
    return float(torch.stack(rows).std())


@pytest.fixture()
def scaled_subjects(m64, pairs):
    """Subject-token embedding rows blown up 8x, so the subject std is far from the vocabulary std."""
    W = m64.W_E
    ids = sorted({t for p in pairs for t in p.clean_tokens[p.subject_span[0]:p.subject_span[1]]})
    saved = W[ids].clone()
    with torch.no_grad():
        W[ids] *= 8.0
    m64.__dict__.pop("_frc_embedding_std", None)
    yield m64
    with torch.no_grad():
        W[ids] = saved
    m64.__dict__.pop("_frc_embedding_std", None)


def test_sigma_is_three_times_subject_embedding_std(scaled_subjects, pairs):
    m = scaled_subjects
    brute = _brute_subject_std(m, pairs)
    assert subject_embedding_std(m, pairs) == pytest.approx(brute, rel=1e-12)
    t = causal_tracing(m, pairs, kinds=("mlp",), roles=["subject_last"], n_samples=2, seed=0)
    assert t.noise_std == pytest.approx(3 * brute, rel=1e-12)
    assert t.scores.meta["noise_std_source"] == "subject_tokens"
    # the old unit (the whole vocabulary's std) is far from it here: the test fails on the old code
    assert abs(3 * embedding_std(m) - t.noise_std) > 0.5 * t.noise_std
    # flat token ids give the same number as the pairs
    ids = [tok for p in pairs for tok in p.clean_tokens[p.subject_span[0]:p.subject_span[1]]]
    assert subject_embedding_std(m, ids) == pytest.approx(brute, rel=1e-12)


def test_noise_is_only_on_subject_positions_and_has_sigma(pairs):
    sigma = 2.5
    n = subject_noise(pairs, 40, 64, sigma, seed=3)
    assert n.shape == (len(pairs) * 40, max(len(p.clean_tokens) for p in pairs), 64)
    for f, p in enumerate(pairs):
        s, e = p.subject_span
        rows = n[f * 40:(f + 1) * 40]
        outside = torch.ones(rows.shape[1], dtype=torch.bool)
        outside[s:e] = False
        assert torch.count_nonzero(rows[:, outside]) == 0
        assert (rows[:, s:e] != 0).all()
        assert float(rows[:, s:e].std()) == pytest.approx(sigma, rel=0.05)  # 40*(e-s)*64 >= 2560 draws


def test_trace_uses_that_noise(m64, pairs):
    """Oracle: a plain forward of the clean prompt with subject_noise(...) added at hook_embed reproduces the
    trace's corrupted probability (so the noise the trace uses is the one tested above)."""
    sigma = 0.7
    t = causal_tracing(m64, pairs, kinds=("mlp",), roles=["subject_last"], n_samples=3, seed=5, noise_std=sigma)
    assert t.noise_std == sigma and t.scores.meta["noise_std_source"] == "given"
    noise = subject_noise(pairs, 3, m64.cfg.d_model, sigma, seed=5)
    toks = [list(p.clean_tokens) for p in pairs for _ in range(3)]
    batch = make_batch(m64, toks, [[p.answer_tokens[0]] for p in pairs for _ in range(3)])
    with torch.no_grad(), m64.hooks([("hook_embed", lambda x, name: x + noise.to(x.dtype))]):
        p = answer_prob(m64, m64.final_hidden(batch.tokens, batch.mask), batch)
    torch.testing.assert_close(t.p_corrupted, p.double().view(len(pairs), 3).mean(1), atol=1e-10, rtol=0)


def test_deterministic_and_seed_dependent(m64, pairs):
    a = causal_tracing(m64, pairs, kinds=("mlp", "attn"), roles=["subject_last"], n_samples=2, seed=1)
    b = causal_tracing(m64, pairs, kinds=("mlp", "attn"), roles=["subject_last"], n_samples=2, seed=1)
    c = causal_tracing(m64, pairs, kinds=("mlp", "attn"), roles=["subject_last"], n_samples=2, seed=2)
    torch.testing.assert_close(a.scores.values, b.scores.values, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(a.p_corrupted, b.p_corrupted, atol=0, rtol=0)
    assert not torch.equal(a.p_corrupted, c.p_corrupted)
    # the explicit sigma equal to the default gives the identical trace
    d = causal_tracing(m64, pairs, kinds=("mlp", "attn"), roles=["subject_last"], n_samples=2, seed=1,
                       noise_std=3 * subject_embedding_std(m64, pairs))
    torch.testing.assert_close(a.scores.values, d.scores.values, equal_nan=True, atol=1e-12, rtol=0)


def test_default_samples_and_subject_last_arrays(m64, pairs):
    assert inspect.signature(causal_tracing).parameters["n_samples"].default >= 10
    t = causal_tracing(m64, pairs, kinds=("mlp", "attn"), roles=["subject_last"], n_samples=1, seed=0)
    for kind, comp in (("mlp", "mlp_out"), ("attn", "attn_out")):
        arr = t.scores.per_prompt_array(comp)  # [n_facts, n_layers, n_pos]
        sl = t.at_subject_last(kind)
        assert sl.shape == (len(pairs), m64.cfg.n_layers)
        for f, p in enumerate(pairs):
            np.testing.assert_array_equal(sl[f], arr[f][:, p.subject_span[1] - 1])
        assert np.isfinite(sl).all()
    with pytest.raises(InputError, match="not traced"):
        t.at_subject_last("states")


def test_bad_noise_std_and_pairinputs_noise(m64, pairs):
    with pytest.raises(InputError, match="noise_std"):
        causal_tracing(m64, pairs, kinds=("mlp",), roles=["subject_last"], n_samples=1, noise_std=0.0)
    with pytest.raises(InputError):
        subject_embedding_std(m64, [])
    # noise pairs (corrupted prompt = clean prompt) in PairInputs: same ROME unit, or the given sigma
    facts = [Fact("capital", "France", "The capital of France is", " Paris", template="The capital of {} is")]
    noise_pairs = build_pairs(facts, m64.tokenizer)
    assert noise_pairs[0].corruption == "noise"
    inp = PairInputs.from_pairs(m64, noise_pairs, seed=0)
    s, e = noise_pairs[0].subject_span
    assert torch.count_nonzero(inp.noise[0, :s]) == 0 and torch.count_nonzero(inp.noise[0, e:]) == 0
    gen = torch.Generator().manual_seed(0)
    expect = 3 * subject_embedding_std(m64, noise_pairs) * torch.randn(e - s, m64.cfg.d_model, generator=gen,
                                                                       dtype=torch.float64)
    torch.testing.assert_close(inp.noise[0, s:e].double(), expect, atol=1e-12, rtol=0)
    given = PairInputs.from_pairs(m64, noise_pairs, seed=0, noise_std=1.5)
    torch.testing.assert_close(given.noise[0, s:e].double(), expect / (3 * subject_embedding_std(m64, noise_pairs))
                               * 1.5, atol=1e-12, rtol=0)
