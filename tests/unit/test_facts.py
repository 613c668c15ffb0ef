"""Unit tests of circuit_discovery.facts (no model download; small in-test tokenizers)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from circuit_discovery.facts import (
    ROLES,
    DatasetError,
    Fact,
    FactPair,
    answer_ranks,
    build_pairs,
    encode,
    filter_known,
    group_by_length,
    guess_subject,
    load_builtin,
    load_counterfact,
    load_dataset,
    load_known_1000,
    load_rich,
    load_seed,
    prepare_fact,
    select_relations,
    split_seed,
    stack_pairs,
    subject_span,
    token_roles,
)

from ..conftest import SHARED

KNOWN_1000 = SHARED / "datasets" / "known_1000.json"
REQUIRED = ["entity_location", "capital_city", "historical_date", "person_occupation", "country_language",
            "country_currency", "athlete_sport", "landmark_country", "city_country", "element_symbol",
            "book_author", "company_founder"]


class RegexTokenizer:
    """Gemma-like toy tokenizer: words keep their leading space, digits are single tokens and a space before
    a digit is a token of its own (so " 1789" -> " ", "1", "7", "8", "9"). Ids are assigned on first sight."""

    PAT = re.compile(r" ?[A-Za-z']+| |\d|.", re.S)
    bos_token_id = 1
    pad_token_id = 0

    def __init__(self) -> None:
        self.vocab = {"<pad>": 0, "<bos>": 1}
        self.inv = ["<pad>", "<bos>"]

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.inv)
            self.inv.append(piece)
        return self.vocab[piece]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self._id(p) for p in self.PAT.findall(text)]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, **_) -> str:
        return "".join(self.inv[i] for i in ids)


def hf_wordlevel_tokenizer(texts):
    """A whitespace WordLevel tokenizer wrapped in PreTrainedTokenizerFast (HF path, offsets available)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


def brute_force_span(tok, tokens, subject):
    """Oracle: the (unique shortest) token window whose decoded text, stripped, is the subject."""
    hits = [(s, e) for s in range(len(tokens)) for e in range(s + 1, len(tokens) + 1)
            if tok.decode(tokens[s:e]).strip() == subject]
    return min(hits, key=lambda h: (h[1] - h[0], h[0]))


@pytest.fixture(scope="module")
def builtin():
    return load_builtin()


@pytest.fixture(scope="module")
def regex_pairs(builtin):
    tok = RegexTokenizer()
    return tok, build_pairs(builtin, tok, seed=0)


# ----------------------------------------------------------------------------------------- built-in data

def test_builtin_relations_and_facts(builtin):
    assert len(builtin) >= 18  # the default selection
    full = load_builtin(include_non_default=True)
    assert set(REQUIRED) <= set(full)
    for name, facts in full.items():
        rel = full.relations[name]
        assert rel.description and rel.template.count("{}") == 1
        assert len(facts) >= 20, name
        assert len({f.subject for f in facts}) == len(facts), f"duplicate subject in {name}"
        for f in facts:
            assert f.prompt == rel.template.replace("{}", f.subject)
            for a in f.answers:
                assert a.startswith(" ") and not a.startswith("  ") and a == a.rstrip(), (name, a)
    assert all(re.fullmatch(r" \d{4}", f.answer) for f in builtin["historical_date"])
    assert builtin.n_facts == sum(builtin.counts().values()) == len(builtin.facts)


KNOWN_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "known_facts.json"


def test_default_selection_leaves_out_non_default_relations():
    from circuit_discovery.facts import builtin_relations

    full = load_builtin(include_non_default=True)
    default = load_builtin()
    off = [n for n, r in full.relations.items() if not r.default]
    assert set(default) == set(full) - set(off) and len(default) >= 18
    assert builtin_relations() == default.relation_names
    assert builtin_relations(include_non_default=True) == full.relation_names
    if off:  # named, a non-default relation still loads (builtin and load_dataset alike)
        assert load_builtin(off).relation_names == off
        assert load_dataset("builtin", relations=off[:1]).relation_names == off[:1]
    again = load_rich(full.to_dict())
    assert again.relations == full.relations  # the "default" flag survives the rich round trip
    flagged = load_rich({"relations": [{"name": "r", "default": False, "facts": [
        {"subject": "a", "prompt": "a is", "answer": "b"}]}]})
    assert flagged.relations["r"].default is False and flagged.to_dict()["relations"][0]["default"] is False


def test_default_relations_have_20_known_facts_in_the_committed_measurement():
    """benchmarks/results/known_facts.json (the default model at k = 1) must cover every built-in relation: a
    default relation has >= 20 known facts and >= 12 discovery / >= 8 held-out usable subject-swap pairs (a relation
    without them must be marked "default": false). Fails when facts or relations change without re-measuring."""
    res = json.loads(KNOWN_RESULTS.read_text())["builtin"]
    per = res["per_relation"]
    full = load_builtin(include_non_default=True)
    assert set(per) == set(full), "re-run benchmarks/known_facts.py after changing the built-in facts"
    for name, rel in full.relations.items():
        r = per[name]
        assert r["n"] == len(full[name]), name
        assert r["default"] == rel.default, name
        enough = r["n_known"] >= 20 and r["discovery_pairs"] >= 12 and r["held_out_pairs"] >= 8
        assert enough or not rel.default, (name, r)  # a relation without enough facts is out of the default run


def test_rich_round_trip(builtin, tmp_path):
    again = load_rich(builtin.to_dict())
    assert again.facts == builtin.facts and again.relations == builtin.relations
    path = tmp_path / "ds.json"
    builtin.save(path)
    assert load_dataset(path).facts == builtin.facts
    assert load_dataset("builtin").facts == builtin.facts
    assert load_dataset(builtin) is builtin


def test_rich_object_form_flat_list_and_template_fill():
    ds = load_rich({"relations": {"capital_city": {"template": "The capital of {} is",
                                                   "facts": [{"subject": "France", "answer": "Paris",
                                                              "aliases": ["Paris city"]}]}}})
    f = ds["capital_city"][0]
    assert (f.prompt, f.answer, f.aliases) == ("The capital of France is", " Paris", (" Paris city",))
    flat = load_dataset([{"relation": "r", "subject": "Japan", "prompt": "Japan uses the", "answer": " yen"}])
    assert flat["r"][0] == Fact("r", "Japan", "Japan uses the", " yen")


# ----------------------------------------------------------------------------------------- seed format

def test_seed_format_example():
    ds = load_seed({"entity_location": [{"clean": "The Eiffel Tower is located in Paris",
                                         "corrupted": "The Eiffel Tower is located in London"}]})
    f = ds["entity_location"][0]
    assert f.prompt == "The Eiffel Tower is located in"
    assert (f.answer, f.counterfactual, f.subject) == (" Paris", " London", "The Eiffel Tower")
    assert f.template == "{} is located in"


def test_seed_multiword_ending_and_explicit_subject():
    assert split_seed("The capital of India is New Delhi", "The capital of India is Mumbai") == (
        "The capital of India is", " New Delhi", " Mumbai")
    ds = load_seed({"element_symbol": [{"clean": "The chemical symbol for gold is Au",
                                        "corrupted": "The chemical symbol for gold is Ag", "subject": "gold"}]})
    assert ds["element_symbol"][0].subject == "gold"


@pytest.mark.parametrize("prompt,subject", [
    ("The capital of France is", "France"),
    ("The Eiffel Tower is located in", "The Eiffel Tower"),
    ("In 1990 Leonardo da Vinci was", "Leonardo da Vinci"),
    ("Where is the Statue of Liberty? It is in", "Statue of Liberty"),
    ("the chemical symbol for gold is", None),
])
def test_guess_subject(prompt, subject):
    assert guess_subject(prompt) == subject


# ----------------------------------------------------------------------------------------- bad input

def _one_line_error(fn, *args, match):
    with pytest.raises(DatasetError, match=match) as info:
        fn(*args)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    return str(info.value)


def test_errors_are_one_line_and_actionable(tmp_path):
    _one_line_error(load_dataset, {}, match="empty")
    _one_line_error(load_dataset, [], match="empty")
    _one_line_error(load_seed, {"r": []}, match="empty")
    _one_line_error(load_seed, {"r": [{"clean": "a b c"}]}, match="entry 0 of 'r' is malformed.*'clean' and 'corrupted'")
    _one_line_error(load_seed, {"r": ["text"]}, match="malformed")
    _one_line_error(load_seed, {"r": [{"clean": "Paris is nice", "corrupted": "London is nice"}]},
                    match="share no leading words")
    _one_line_error(load_seed, {"r": [{"clean": "The capital of France is Paris",
                                       "corrupted": "The capital of France is Paris"}]}, match="no differing ending")
    _one_line_error(load_seed, {"r": [{"clean": "the symbol for gold is Au", "corrupted": "the symbol for gold is Ag"}]},
                    match="add a 'subject' field")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    _one_line_error(load_dataset, bad, match="not valid JSON")
    _one_line_error(load_dataset, tmp_path / "missing.json", match="not found")
    _one_line_error(load_dataset, {"relations": [{"name": "r", "facts": [{"subject": "x"}]}]},
                    match="rich dataset invalid")
    _one_line_error(load_dataset, [{"foo": 1}], match="unrecognised dataset format")
    msg = _one_line_error(select_relations, load_builtin(), ["capital_city", "no_such"], match="unknown relation")
    assert "'no_such'" in msg and "capital_city" in msg and "dish_country" in msg
    _one_line_error(Fact, "r", "France", "The capital of France is", "", match="non-empty")


# ----------------------------------------------------------------------------------------- ROME formats

def test_known_1000_inline_sample():
    rows = [{"known_id": 0, "subject": "Vinson Massif", "attribute": "Antarctica",
             "template": "{} is located in the continent", "prediction": " of Antarctica.",
             "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"},
            {"known_id": 1, "subject": "Beats Music", "attribute": "Apple", "template": "{} is owned by",
             "prediction": "", "prompt": "Beats Music is owned by", "relation_id": "P9999"}]
    ds = load_dataset(rows)
    assert ds.relation_names == ["continent", "P9999"]
    f = ds["continent"][0]
    assert (f.subject, f.prompt, f.answer) == ("Vinson Massif", "Vinson Massif is located in the continent of",
                                               " Antarctica")
    assert load_known_1000(rows, readable_names=False).relation_names == ["P30", "P9999"]


@pytest.mark.skipif(not KNOWN_1000.is_file(), reason=f"ROME known_1000.json not present at {KNOWN_1000}")
def test_known_1000_real_file():
    raw = json.loads(KNOWN_1000.read_text(encoding="utf-8"))
    ds = load_dataset(KNOWN_1000)
    assert ds.n_facts == len(raw) == 1209
    assert len(ds) == len({r["relation_id"] for r in raw})
    assert sum(len(v) for v in ds.values()) == 1209
    assert Counter(f.relation for f in ds.facts)["capital"] == sum(r["relation_id"] == "P36" for r in raw)
    assert all(f.answer.startswith(" ") and f.subject in f.prompt for f in ds.facts)


def test_counterfact_record():
    rec = [{"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                                                "target_new": {"str": "English", "id": "Q1860"},
                                                "target_true": {"str": "French", "id": "Q150"},
                                                "subject": "Danielle Darrieux"}}]
    ds = load_dataset(rec)
    f = ds["native_language"][0]
    assert (f.prompt, f.answer, f.counterfactual) == ("The mother tongue of Danielle Darrieux is", " French", " English")
    _one_line_error(load_counterfact, [{"requested_rewrite": {"prompt": "x"}}], match="lacks requested_rewrite")


# ----------------------------------------------------------------------------------------- roles and spans

def test_token_roles_closed_form():
    assert token_roles(6, (4, 5), True) == ["bos", "relation", "relation", "relation", "subject_last", "last"]
    assert token_roles(7, (1, 4), True) == ["bos", "subject_first", "subject_middle", "subject_last",
                                            "relation_first", "relation", "last"]
    assert token_roles(4, (0, 2), False) == ["subject_first", "subject_last", "relation_first", "last"]
    assert set(token_roles(9, (2, 6), True)) <= set(ROLES)


def test_subject_span_against_brute_force(regex_pairs):
    tok, pairs = regex_pairs
    for p in pairs:
        assert p.subject_span == brute_force_span(tok, list(p.clean_tokens), p.subject), p.clean_prompt
        s, e = p.subject_span
        assert p.roles == token_roles(len(p.clean_tokens), (s, e), True)
        assert p.roles[0] == "bos" and p.roles[-1] == "last"


def test_subject_span_hf_tokenizer_with_repeated_subject():
    tok = hf_wordlevel_tokenizer(["Paris is in France , and Paris is the capital of"])
    prompt = "Paris is in France , and Paris is the capital of"
    full = encode(tok, prompt)
    assert full[0] == tok.bos_token_id and len(full) == 12
    assert subject_span(tok, prompt, "Paris") == (1, 2)
    assert subject_span(tok, prompt, "Paris", start=prompt.rindex("Paris")) == (7, 8)


# ----------------------------------------------------------------------------------------- pairs

def test_every_builtin_fact_builds_a_consistent_pair(builtin, regex_pairs):
    tok, pairs = regex_pairs
    assert len(pairs) == builtin.n_facts
    by_prompt = {f.prompt: f for f in builtin.facts}
    for p, f in zip(pairs, builtin.facts):
        assert isinstance(p, FactPair) and p.relation == f.relation and p.subject == f.subject
        assert p.clean_prompt + p.answer == f.prompt + f.answer
        assert list(p.clean_tokens) == encode(tok, p.clean_prompt)
        assert list(p.answer_tokens) == encode(tok, p.answer, prepend_bos=False)
        assert len(p.corrupted_tokens) == len(p.clean_tokens) == len(p.roles)
        if p.corruption == "subject_swap":
            partner = by_prompt[p.corrupted_prompt.rstrip()]
            assert partner.relation == f.relation and partner.subject == p.corrupted_subject != p.subject
            assert partner.answer.strip() != f.answer.strip()
            assert p.counterfactual_answer.strip() == partner.answer.strip()
            assert prepare_fact(tok, partner).roles == tuple(p.roles)
            assert list(p.corrupted_tokens) == encode(tok, p.corrupted_prompt)
        else:
            assert p.corrupted_prompt == p.clean_prompt and p.corrupted_tokens == p.clean_tokens
            assert p.corrupted_subject is None
            assert p.counterfactual_answer is not None and p.first_token_differs


def test_swap_iff_brute_force_partner_exists(builtin, regex_pairs):
    """Oracle: a same-relation fact with identical roles and a different answer exists <=> subject_swap."""
    tok, pairs = regex_pairs
    prepared = [prepare_fact(tok, f) for f in builtin.facts]
    for i, (p, a) in enumerate(zip(pairs, prepared)):
        exists = any(b.fact.relation == a.fact.relation and b.roles == a.roles and b.fact.subject != a.fact.subject
                     and b.answer_tokens != a.answer_tokens for j, b in enumerate(prepared) if j != i)
        assert (p.corruption == "subject_swap") == exists
        if exists and any(b.fact.relation == a.fact.relation and b.roles == a.roles
                          and b.answer_tokens[0] != a.answer_tokens[0] for b in prepared):
            assert p.first_token_differs


def test_years_move_the_space_token_into_the_prompt(regex_pairs):
    tok, pairs = regex_pairs
    p = next(p for p in pairs if p.subject == "The storming of the Bastille")
    assert p.clean_prompt == "The storming of the Bastille took place in the year "
    assert p.answer == "1789" and [tok.inv[i] for i in p.answer_tokens] == ["1", "7", "8", "9"]
    assert tok.inv[p.clean_tokens[-1]] == " " and p.roles[-1] == "last"
    assert p.corruption == "subject_swap" and re.fullmatch(r"\d{4}", p.counterfactual_answer)


def test_pairs_are_deterministic_per_seed(builtin):
    tok = RegexTokenizer()
    a = build_pairs(builtin, tok, seed=3)
    assert a == build_pairs(builtin, tok, seed=3)
    b = build_pairs(builtin, tok, seed=4)
    assert [p.corrupted_prompt for p in a] != [p.corrupted_prompt for p in b]


def test_noise_when_no_same_length_partner():
    tok = RegexTokenizer()
    facts = [Fact("capital_city", s, f"The capital of {s} is", a, template="The capital of {} is")
             for s, a in [("France", " Paris"), ("Germany", " Berlin"), ("the United Kingdom", " London")]]
    pairs = build_pairs(facts, tok)
    assert [p.corruption for p in pairs] == ["subject_swap", "subject_swap", "noise"]
    assert pairs[0].corrupted_subject == "Germany" and pairs[0].counterfactual_answer == " Berlin"
    assert pairs[2].counterfactual_answer in (" Paris", " Berlin")
    lone = build_pairs([facts[0]], tok)[0]
    assert lone.corruption == "noise" and lone.counterfactual_answer is None and lone.counterfactual_tokens == ()


def test_seed_counterfactual_is_kept_and_its_subject_preferred():
    ds = load_seed({"capital_city": [
        {"clean": "The capital of France is Paris", "corrupted": "The capital of France is London"},
        {"clean": "The capital of England is London", "corrupted": "The capital of England is Paris"},
        {"clean": "The capital of Italy is Rome", "corrupted": "The capital of Italy is Madrid"},
        {"clean": "The capital of Spain is Madrid", "corrupted": "The capital of Spain is Rome"}]})
    tok = RegexTokenizer()
    for seed in range(5):
        p = {q.subject: q for q in build_pairs(ds, tok, seed=seed)}
        assert p["France"].corrupted_subject == "England" and p["France"].counterfactual_answer == " London"
        assert p["Italy"].corrupted_subject == "Spain" and p["Italy"].counterfactual_answer == " Madrid"


def test_hf_tokenizer_pairs_and_stacking():
    facts = load_builtin(["capital_city"])["capital_city"][:6]
    tok = hf_wordlevel_tokenizer([f.prompt + f.answer for f in facts])
    pairs = build_pairs(facts, tok)
    for p in pairs:
        assert p.clean_tokens[0] == tok.bos_token_id
        assert p.subject_span == brute_force_span(tok, list(p.clean_tokens), p.subject)
        assert p.answer_tokens == (tok.convert_tokens_to_ids(p.answer.strip()),)
    groups = group_by_length(pairs)
    assert sum(len(v) for v in groups.values()) == len(pairs)
    n, same = next(iter(groups.items()))
    t = stack_pairs(same)
    assert t["clean"].shape == t["corrupted"].shape == t["subject_mask"].shape == (len(same), n)
    assert t["answer"].tolist() == [p.answer_tokens[0] for p in same]
    assert t["subject_mask"].sum(1).tolist() == [p.subject_span[1] - p.subject_span[0] for p in same]
    if len(groups) > 1:
        with pytest.raises(DatasetError, match="group_by_length"):
            stack_pairs(pairs)


# ----------------------------------------------------------------------------------------- known filter

def test_answer_ranks_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 6, (7, 11), generator=g).float()  # many ties
    ids = torch.randint(0, 11, (7,), generator=g)
    want = [1 + sum(1 for v in row.tolist() if v > row[i].item()) for row, i in zip(logits, ids.tolist())]
    assert answer_ranks(logits, ids).tolist() == want
    # without ties the rank equals the position in a descending sort + 1
    logits = torch.randn(5, 50, generator=g)
    ids = torch.randint(0, 50, (5,), generator=g)
    order = logits.argsort(dim=1, descending=True)
    assert answer_ranks(logits, ids).tolist() == [(o == i).nonzero().item() + 1 for o, i in zip(order, ids)]
    with pytest.raises(ValueError):
        answer_ranks(logits, [0, 1])


class FakeModel:
    """Implements the two HookedModel methods filter_known uses. ``table[prompt] = {token_id: rank}`` fixes
    the rank of chosen tokens at the last position; the prompt is re-read from the unpadded tokens, so a
    wrong attention mask would look up the wrong row."""

    def __init__(self, tokenizer, table, vocab=64):
        self.tokenizer, self.table, self.vocab, self.calls = tokenizer, table, vocab, 0

    def to_tokens(self, prompts):
        ids = [encode(self.tokenizer, p) for p in prompts]
        n = max(map(len, ids))
        return torch.tensor([i + [self.tokenizer.pad_token_id] * (n - len(i)) for i in ids])

    def last_logits(self, tokens, attention_mask=None):
        self.calls += 1
        out = torch.zeros(tokens.shape[0], self.vocab)
        for r in range(tokens.shape[0]):
            n = int(attention_mask[r].sum())
            assert attention_mask[r, :n].all() and not attention_mask[r, n:].any()
            prompt = self.tokenizer.decode(tokens[r, 1:n].tolist())
            want = self.table[prompt]  # {token: rank}; fill the other top slots with unused tokens
            filler = iter(t for t in range(self.vocab - 1, -1, -1) if t not in want)
            slots = {rank: tid for tid, rank in want.items()}
            base = -100.0 - torch.arange(self.vocab, dtype=torch.float)
            for j in range(1, max(slots) + 1):
                base[slots.get(j) if j in slots else next(filler)] = 100.0 - j
            out[r] = base
        return out


def test_filter_known_with_fake_model():
    tok = RegexTokenizer()
    ds = load_rich({"relations": [
        {"name": "capital_city", "template": "The capital of {} is",
         "facts": [{"subject": "France", "answer": " Paris"}, {"subject": "the United Kingdom", "answer": " London"},
                   {"subject": "Japan", "answer": " Tokyo"}]},
        {"name": "athlete_sport", "template": "The sport played by {} is",
         "facts": [{"subject": "Lionel Messi", "answer": " soccer", "aliases": [" football"]},
                   {"subject": "Roger Federer", "answer": " tennis"}]},
        {"name": "historical_date", "template": "{} took place in the year",
         "facts": [{"subject": "The Battle of Waterloo", "answer": " 1815"}]}]})
    for f in ds.facts:  # register every token before the fake model fixes the vocabulary
        for a in f.answers:
            encode(tok, f.prompt + a)
    tid = lambda s: tok.vocab[s]  # noqa: E731
    table = {"The capital of France is": {tid(" Paris"): 1},
             "The capital of the United Kingdom is": {tid(" London"): 2},
             "The capital of Japan is": {tid(" Tokyo"): 7},
             "The sport played by Lionel Messi is": {tid(" soccer"): 5, tid(" football"): 1},
             "The sport played by Roger Federer is": {tid(" tennis"): 3},
             "The Battle of Waterloo took place in the year ": {tid("1"): 1}}
    model = FakeModel(tok, table, vocab=len(tok.inv) + 5)
    known, report = filter_known(model, ds, k=1, batch_size=2, progress=False)
    assert model.calls == 3
    assert [f.subject for f in known.facts] == ["France", "Lionel Messi", "The Battle of Waterloo"]
    messi = known["athlete_sport"][0]
    assert messi.answer == " football" and messi.aliases == (" soccer",)
    assert {k: (v.n, v.n_known) for k, v in report.per_relation.items()} == {
        "capital_city": (3, 1), "athlete_sport": (2, 1), "historical_date": (1, 1)}
    assert report.per_relation["capital_city"].accuracy == pytest.approx(1 / 3)
    assert [s.rank for s in report.scores] == [1, 2, 7, 1, 3, 1]
    known3, report3 = filter_known(model, ds.facts, k=3, batch_size=32, progress=False, use_aliases=False)
    assert isinstance(known3, list) and [f.subject for f in known3] == [
        "France", "the United Kingdom", "Roger Federer", "The Battle of Waterloo"]
    assert report3.n == 6 and report3.n_known == 4 and report3.to_dict()["per_relation"]["athlete_sport"]["n_known"] == 1


def test_filter_known_with_tiny_gemma3():
    """Oracle: the rank from one unbatched full forward per prompt equals the batched, padded filter's rank."""
    models = pytest.importorskip("circuit_discovery.models")
    model = models.load_model("tiny-gemma3", device="cpu")
    facts = load_builtin(["capital_city", "historical_date"]).head(5)
    known, report = filter_known(model, facts, k=50, batch_size=4, progress=False)
    for score, f in zip(report.scores, facts.facts):
        p = prepare_fact(model.tokenizer, f)
        tokens = torch.tensor([list(p.tokens)])
        with torch.no_grad():
            row = model(tokens)[0, -1]
        want = int((row > row[p.answer_tokens[0]]).sum()) + 1
        assert score.rank == want, f.prompt
        assert score.known == (want <= 50)
    assert report.n == 10 and known.n_facts == report.n_known


def test_informative_pair_moves_shared_answer_prefix():
    tok = RegexTokenizer()
    from dataclasses import replace

    from circuit_discovery.facts import build_pairs, informative_pair
    from circuit_discovery.facts.pairs import encode

    facts = [Fact("historical_date", "the war", "In the year of the war", " 1789"),
             Fact("historical_date", "the fall", "In the year of the fall", " 1492")]
    p = build_pairs(facts, tok, seed=0)[0]
    a, c = encode(tok, " 17 89", prepend_bos=False), encode(tok, " 17 92", prepend_bos=False)
    p = replace(p, answer_tokens=tuple(a), counterfactual_tokens=tuple(c))
    q = informative_pair(p, tok)
    k = next(i for i in range(len(a)) if a[i] != c[i])
    assert q.clean_tokens == p.clean_tokens + tuple(a[:k]) and q.corrupted_tokens == p.corrupted_tokens + tuple(a[:k])
    assert q.answer_tokens == tuple(a[k:]) and q.first_token_differs
    assert len(q.roles) == len(q.clean_tokens) and q.roles[-1] == "last"
    assert informative_pair(replace(p, counterfactual_tokens=()), tok) is None
    assert informative_pair(replace(p, counterfactual_tokens=tuple(a)), tok) is None
    assert informative_pair(replace(p, counterfactual_tokens=(a[0] + 1,)), tok).clean_tokens == p.clean_tokens


# ----------------------------------------------------------------------------------------- splits before pairs

class _TokModel:
    """What relation_pairs needs of a model: its tokenizer."""

    def __init__(self, tok):
        self.tokenizer = tok


def _cfg(**kw):
    from circuit_discovery.pipeline.config import RunConfig

    return RunConfig(**{"max_facts": 12, **kw})


def _subjects(pairs):
    return {p.subject for p in pairs} | {p.corrupted_subject for p in pairs}


def test_split_facts_is_a_deterministic_partition(builtin):
    from circuit_discovery.facts import split_facts

    tok = RegexTokenizer()
    facts = builtin["capital_city"]
    disc, held = split_facts(facts, held_out_fraction=0.4, seed=0, tokenizer=tok)
    assert sorted(disc + held, key=facts.index) == list(facts) and not set(disc) & set(held)
    assert disc == sorted(disc, key=facts.index) and held == sorted(held, key=facts.index)  # input order kept
    assert (disc, held) == split_facts(facts, held_out_fraction=0.4, seed=0, tokenizer=tok)
    assert any(split_facts(facts, held_out_fraction=0.4, seed=s, tokenizer=tok)[1] != held for s in range(1, 6))
    d2, h2 = split_facts(facts, n_held_out=9, seed=0, tokenizer=tok)
    assert len(h2) == 9 and len(d2) == len(facts) - 9


def test_split_facts_rejects_bad_arguments(builtin):
    from circuit_discovery.facts import split_facts

    with pytest.raises(DatasetError, match="not both"):
        split_facts(builtin["capital_city"], n_held_out=3, held_out_fraction=0.3)
    with pytest.raises(DatasetError, match="one relation"):
        split_facts(builtin.select(["capital_city", "city_country"]), n_held_out=3)
    with pytest.raises(DatasetError, match=r"\[0, 1\]"):
        split_facts(builtin["capital_city"], held_out_fraction=1.5)
    with pytest.raises(DatasetError, match="non-empty"):
        split_facts([])


def _random_facts(rng, n_groups):
    """One relation whose subjects have 1..n_groups words (= role groups without a tokenizer) and few answers."""
    facts = []
    for g in range(1, n_groups + 1):
        for j in range(rng.randint(1, 9)):
            subject = " ".join(["W%d_%d" % (j, w) for w in range(g)])
            facts.append(Fact("r", subject, f"Q {subject} is", " A%d" % rng.randint(0, rng.randint(0, 3))))
    return facts


def test_split_keeps_every_side_of_every_group_pairable():
    """Property: in each split, the facts of a role group are none or include two different answers, so no
    pairable fact loses its partners to the split; a group that allows it is split across both sides."""
    import random

    from circuit_discovery.facts import split_facts
    from circuit_discovery.facts.pairs import _both_sides_pairable

    rng = random.Random(0)
    n_split_groups = 0
    for trial in range(300):
        facts = _random_facts(rng, 4)
        frac = rng.choice([0.2, 0.34, 0.4, 0.5, 0.7])
        disc, held = split_facts(facts, held_out_fraction=frac, seed=trial)
        assert sorted(disc + held, key=facts.index) == facts
        for g in {len(f.subject.split()) for f in facts}:
            members = [f for f in facts if len(f.subject.split()) == g]
            if len({f.answer for f in members}) < 2:
                continue  # cannot pair anywhere
            sides = [[f for f in side if f in members] for side in (disc, held)]
            for side in sides:
                assert not side or len({f.answer for f in side}) >= 2, (trial, g, side)
            counts = Counter(f.answer for f in members)
            n_split_groups += all(sides) and _both_sides_pairable(list(counts.values()))
    assert n_split_groups > 100  # groups are really split across both sides, not just sent whole


def test_relation_pairs_keep_held_out_subjects_out_of_discovery(builtin):
    """No subject of a held-out pair (clean or corrupted) appears in any discovery pair, in any relation and
    seed; so mirrored pairs (A vs B in discovery, B vs A held out) cannot occur. Old code: partners were drawn
    over all known facts before the pairs were split."""
    from circuit_discovery.pipeline.attribution_stage import relation_pairs

    tok = RegexTokenizer()
    model = _TokModel(tok)
    n_held = 0
    for seed in range(3):
        for rel in builtin.relation_names:
            out = relation_pairs(model, builtin[rel], _cfg(seed=seed, held_out_facts=8))
            assert set(out) == {"discovery", "held_out"}
            disc, held = out["discovery"], out["held_out"]
            assert not _subjects(disc) & _subjects(held), rel
            assert not {(p.subject, p.corrupted_subject) for p in disc} & {
                (p.corrupted_subject, p.subject) for p in held}
            assert not {p.clean_prompt for p in disc} & {p.corrupted_prompt for p in held}
            n_held += len(held)
    assert n_held > 0


def test_relation_pairs_are_subject_swaps_only_and_capped(builtin):
    """One corruption type: a fact without a same-roles partner in its split gives no pair (old code appended a
    noise pair whose corrupted prompt is the clean prompt). Each split is capped by its own option."""
    from circuit_discovery.pipeline.attribution_stage import relation_pairs

    tok = RegexTokenizer()
    facts = [Fact("capital_city", s, f"The capital of {s} is", a, template="The capital of {} is")
             for s, a in [("France", " Paris"), ("Germany", " Berlin"), ("Italy", " Rome"), ("Spain", " Madrid"),
                          ("Japan", " Tokyo"), ("the United Kingdom", " London")]]
    out = relation_pairs(_TokModel(tok), facts, _cfg(max_facts=12, held_out_facts=8))
    pairs = out["discovery"] + out["held_out"]
    assert pairs and all(p.corruption == "subject_swap" and p.corrupted_prompt != p.clean_prompt for p in pairs)
    assert "the United Kingdom" not in _subjects(pairs)
    big = relation_pairs(_TokModel(tok), load_builtin()["capital_city"], _cfg(max_facts=4, held_out_facts=2))
    assert len(big["discovery"]) == 4 and len(big["held_out"]) == 2
    dflt = relation_pairs(_TokModel(tok), load_builtin()["capital_city"], _cfg(max_facts=12))  # no held_out_facts
    assert len(dflt["held_out"]) <= 8


def test_api_splits_all_known_facts_before_pairing(monkeypatch):
    """CircuitDiscovery pairs inside each split of all known facts (old code: partners from the first max_facts
    facts, then split, so held-out subjects were discovery partners)."""
    import circuit_discovery.pipeline.circuit_stage as cs
    from circuit_discovery import CircuitDiscovery

    seen = {}

    def fake_circuit(model, rel, pairs, cfg, *a, **k):
        seen[rel] = pairs
        raise StopIteration

    monkeypatch.setattr(cs, "circuit_for_relation", fake_circuit)
    d = CircuitDiscovery(model_name="tiny-gemma3", device="cpu", known_k=10**6, progress=False, max_facts=4,
                         held_out_facts=3)
    with pytest.raises(StopIteration):
        d.discover_all_circuits(relations=["capital_city"])
    pairs = seen["capital_city"]
    disc, held = pairs["discovery"], pairs["held_out"]
    assert len(disc) == 4 and 1 <= len(held) <= 3
    assert not _subjects(disc) & _subjects(held)
    assert all(p.corruption == "subject_swap" for p in disc + held)


def test_noise_fallback_uses_one_corruption_type_for_the_whole_relation():
    """A relation without any subject-swap pair (the seed README's two facts of different token lengths) gets no
    pairs, or with ``noise_fallback`` only noise pairs (never mixed with subject swaps); a relation with swap pairs
    never gets noise pairs."""
    from circuit_discovery.pipeline.attribution_stage import relation_pairs

    tok = RegexTokenizer()
    seed = load_seed({"entity_location": [
        {"clean": "The Eiffel Tower is located in Paris", "corrupted": "The Eiffel Tower is located in London"},
        {"clean": "The Colosseum is located in Rome", "corrupted": "The Colosseum is located in Paris"}]})
    facts = seed["entity_location"]
    assert relation_pairs(_TokModel(tok), facts, _cfg()) == {"discovery": [], "held_out": []}
    out = relation_pairs(_TokModel(tok), facts, _cfg(), noise_fallback=True)
    pairs = out["discovery"] + out["held_out"]
    assert len(pairs) == 2 and {p.corruption for p in pairs} == {"noise"}
    assert {p.counterfactual_answer for p in pairs} == {" London", " Paris"}  # the seed's own counterfactuals
    mixed = relation_pairs(_TokModel(tok), load_builtin()["capital_city"], _cfg(), noise_fallback=True)
    assert {p.corruption for p in mixed["discovery"] + mixed["held_out"]} == {"subject_swap"}
    with pytest.raises(DatasetError, match="partners"):
        build_pairs(facts, tok, partners="across")
