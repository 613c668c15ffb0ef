"""circuit_discovery.facts with the real Gemma 3 tokenizer (and model).

The tokenizer is read from ``~/.cache/circuit_discovery/models/gemma-3-270m/`` (saved by the model
loader), or from the folder named by ``FRC_GEMMA_TOKENIZER``; tests skip with a reason where neither exists.
Run with ``pytest -m integration tests/integration/test_facts_real.py -s`` to see the summary tables.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from circuit_discovery.facts import build_pairs, filter_known, load_builtin, load_known_1000

from ..conftest import SHARED

pytestmark = pytest.mark.integration

TOKENIZER_DIR = Path(os.environ.get("FRC_GEMMA_TOKENIZER",
                                    Path.home() / ".cache" / "circuit_discovery" / "models" / "gemma-3-270m"))
KNOWN_1000 = SHARED / "datasets" / "known_1000.json"


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").is_file() and not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.skip(f"real Gemma 3 tokenizer not cached at {TOKENIZER_DIR} (load the built-in model once, "
                    f"or set FRC_GEMMA_TOKENIZER)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _subject_window_ok(tok, pair) -> bool:
    """The span's tokens spell the subject (a token straddling the boundary, e.g. ")'", is included)."""
    s, e = pair.subject_span
    text = tok.decode(list(pair.clean_tokens[s:e])).strip()
    inner = tok.decode(list(pair.clean_tokens[s + 1:e - 1])).strip() if e - s > 2 else ""
    return pair.subject in text and inner in pair.subject


def test_every_builtin_fact_builds_a_pair(tokenizer):
    ds = load_builtin(include_non_default=True)
    pairs = build_pairs(ds, tokenizer, seed=0)
    assert len(pairs) == ds.n_facts
    assert all(p.clean_tokens[0] == tokenizer.bos_token_id for p in pairs)
    assert all(_subject_window_ok(tokenizer, p) for p in pairs)
    assert all(len(p.clean_tokens) == len(p.corrupted_tokens) == len(p.roles) for p in pairs)

    counts = Counter((p.relation, p.corruption) for p in pairs)
    print("\nrelation                 swap  noise")
    for r in ds:
        print(f"{r:24s} {counts[(r, 'subject_swap')]:4d}  {counts[(r, 'noise')]:5d}")
    n_swap = sum(p.corruption == "subject_swap" for p in pairs)
    share = n_swap / len(pairs)
    print(f"same-length partner: {n_swap}/{len(pairs)} = {share:.1%}; "
          f"first answer token differs: {sum(p.first_token_differs for p in pairs)}")
    multi = sorted({(p.relation, p.answer) for p in pairs if len(p.answer_tokens) > 1})
    print(f"multi-token answers ({len(multi)}):", ", ".join(f"{r}:{a!r}" for r, a in multi))
    assert share >= 0.9
    assert all(counts[(r, "subject_swap")] > 0 for r in ds)


def test_years_predict_a_digit_first(tokenizer):
    pairs = build_pairs(load_builtin(["historical_date"]), tokenizer)
    for p in pairs:
        assert p.clean_prompt.endswith("year ") and p.answer.isdigit()
        assert [tokenizer.decode([t]) for t in p.answer_tokens] == list(p.answer)  # Gemma splits digits
        assert tokenizer.convert_ids_to_tokens(p.clean_tokens[-1]) == "▁"


@pytest.mark.skipif(not KNOWN_1000.is_file(), reason=f"ROME known_1000.json not present at {KNOWN_1000}")
def test_known_1000_pairs(tokenizer):
    ds = load_known_1000(KNOWN_1000)
    pairs = build_pairs(ds, tokenizer)
    assert len(pairs) == 1209
    assert all(_subject_window_ok(tokenizer, p) for p in pairs)
    share = sum(p.corruption == "subject_swap" for p in pairs) / len(pairs)
    print(f"\nknown_1000: same-length partner for {share:.1%} of {len(pairs)} facts")
    assert share > 0.5


def test_filter_known_with_builtin_model():
    models = pytest.importorskip("circuit_discovery.models")
    try:
        model = models.load_model(device="auto")
    except Exception as err:  # noqa: BLE001 - any load failure means the environment lacks the model
        pytest.skip(f"built-in model unavailable: {err}")
    # a sample of each relation keeps the test short; benchmarks/known_facts.py measures every fact
    full = load_builtin()
    ds = type(full)({r: full[r][:4] for r in full.relation_names}, full.relations)
    known, report = filter_known(model, ds, k=1, batch_size=32, progress=False)
    print("\nrelation                 known/n   accuracy")
    for r, acc in report.per_relation.items():
        print(f"{r:24s} {acc.n_known:3d}/{acc.n:<3d}   {acc.accuracy:.2f}")
    print(f"overall {report.n_known}/{report.n} = {report.accuracy:.1%}")
    assert report.n == ds.n_facts and known.n_facts == report.n_known
    assert report.accuracy > 0.2


def test_split_pairs_stay_inside_their_split_with_the_real_tokenizer(tokenizer):
    """Every default relation (all its facts) fills both splits, with subject-swap pairs only, and no subject of
    a held-out pair (clean or corrupted) occurs in a discovery pair."""
    from types import SimpleNamespace

    from circuit_discovery.pipeline.attribution_stage import relation_pairs
    from circuit_discovery.pipeline.config import RunConfig

    model, cfg = SimpleNamespace(tokenizer=tokenizer), RunConfig()
    ds = load_builtin()
    print("\nrelation                 discovery  held-out")
    for rel in ds:
        out = relation_pairs(model, ds[rel], cfg)
        disc, held = out["discovery"], out["held_out"]
        print(f"{rel:24s} {len(disc):9d}  {len(held):8d}")
        assert len(disc) == cfg.max_facts and len(held) == cfg.held_out_facts, rel
        subjects = [{p.subject for p in x} | {p.corrupted_subject for p in x} for x in (disc, held)]
        assert not subjects[0] & subjects[1], rel
        assert all(p.corruption == "subject_swap" for p in disc + held)
