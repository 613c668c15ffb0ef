"""Clean/corrupted fact pairs: tokenization, subject spans, position roles and partner choice.

The tokenizer is anything with ``encode(text, add_special_tokens=False)`` or ``__call__`` returning
``{"input_ids": ...}`` (a Hugging Face tokenizer); BOS is its ``bos_token_id`` and is prepended when
``prepend_bos`` is true (Gemma's ``<bos>``), matching ``HookedModel.to_tokens(prepend_bos=True)``.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from circuit_discovery.facts.types import Dataset, DatasetError, Fact, FactPair
from circuit_discovery.token_roles import token_roles  # re-exported: facts.pairs.token_roles


class PairError(DatasetError):
    """A fact cannot be turned into a pair (e.g. the subject does not align with token boundaries)."""


# --------------------------------------------------------------------------- tokenization helpers

def encode(tokenizer, text: str, prepend_bos: bool = True) -> list[int]:
    """Token ids of ``text`` without special tokens, with the tokenizer's BOS first if ``prepend_bos``."""
    if hasattr(tokenizer, "encode"):
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [bos, *ids]
    return ids


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def answer_tokens(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer, tokenized without BOS: ``[n_answer_tokens]``."""
    ids = encode(tokenizer, answer, prepend_bos=False)
    if not ids:
        raise PairError(f"answer {answer!r} tokenizes to nothing; give a non-empty answer")
    return ids


def align_answer(tokenizer, prompt: str, answer: str) -> tuple[str, str]:
    """Move a whitespace-only first answer token to the end of the prompt.

    Gemma tokenizes ``" 1789"`` as ``"▁" "1" "7" "8" "9"``; predicting ``"▁"`` says nothing about the
    year, so the pair uses prompt ``"... in the year "`` and answer ``"1789"`` instead. Returns
    ``(prompt, answer)`` unchanged where the first answer token carries content.
    """
    ids = answer_tokens(tokenizer, answer)
    if len(ids) < 2 or _decode(tokenizer, ids[:1]).strip():
        return prompt, answer
    stripped = answer.lstrip()
    if answer_tokens(tokenizer, stripped) != ids[1:]:
        return prompt, answer
    return prompt + answer[: len(answer) - len(stripped)], stripped


def subject_span(tokenizer, prompt: str, subject: str, start: int | None = None,
                 prepend_bos: bool = True) -> tuple[int, int]:
    """Half-open token range ``(start, end)`` of ``subject`` in the tokenized ``prompt``.

    ``start`` is the character offset of the subject (default: its first occurrence). Counts the
    tokens of the text before and through the subject and checks they are prefixes of the prompt's
    tokens; falls back to the tokenizer's offset mapping where a token straddles the boundary.
    """
    if start is None:
        start = prompt.find(subject)
    if start < 0 or prompt[start:start + len(subject)] != subject:
        raise PairError(f"subject {subject!r} not found in prompt {prompt!r}")
    end = start + len(subject)
    full = encode(tokenizer, prompt, prepend_bos)
    before_text = prompt[:start].rstrip()
    before = encode(tokenizer, before_text, prepend_bos) if before_text else encode(tokenizer, "", prepend_bos)
    through = encode(tokenizer, prompt[:end], prepend_bos)
    if full[:len(before)] == before and full[:len(through)] == through and len(through) > len(before):
        return len(before), len(through)
    return _span_from_offsets(tokenizer, prompt, start, end, prepend_bos, len(full))


def _span_from_offsets(tokenizer, prompt: str, start: int, end: int, prepend_bos: bool,
                       n_full: int) -> tuple[int, int]:
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (TypeError, KeyError, NotImplementedError, ValueError):
        raise PairError(f"subject at chars {start}:{end} of {prompt!r} does not fall on token boundaries and the "
                        f"tokenizer gives no offsets; use a fast tokenizer or rephrase the prompt") from None
    shift = n_full - len(offsets)
    hit = [i for i, (a, b) in enumerate(offsets)
           if b > a and a < end and b > start and prompt[max(a, start):min(b, end)].strip()]
    if not hit:
        raise PairError(f"no token of {prompt!r} covers the subject at chars {start}:{end}")
    return hit[0] + shift, hit[-1] + 1 + shift


# --------------------------------------------------------------------------- pair building

@dataclass(frozen=True)
class _Prepared:
    fact: Fact
    prompt: str
    answer: str
    moved: str  # whitespace moved from the answer to the prompt
    tokens: tuple[int, ...]
    answer_tokens: tuple[int, ...]
    span: tuple[int, int]
    roles: tuple[str, ...]


def _subject_start(fact: Fact) -> int:
    if fact.template and "{}" in fact.template and fact.template.replace("{}", fact.subject, 1) == fact.prompt:
        return fact.template.index("{}")
    return fact.prompt.find(fact.subject)


def prepare_fact(tokenizer, fact: Fact, prepend_bos: bool = True) -> _Prepared:
    """Tokenize one fact: aligned prompt/answer, tokens ``[pos]``, answer tokens, subject span, roles."""
    prompt, answer = align_answer(tokenizer, fact.prompt, fact.answer)
    tokens = encode(tokenizer, prompt, prepend_bos)
    span = subject_span(tokenizer, prompt, fact.subject, _subject_start(fact), prepend_bos)
    has_bos = prepend_bos and getattr(tokenizer, "bos_token_id", None) is not None
    roles = token_roles(len(tokens), span, has_bos)
    return _Prepared(fact, prompt, answer, fact.answer[: len(fact.answer) - len(answer)], tuple(tokens),
                     tuple(answer_tokens(tokenizer, answer)), span, tuple(roles))


def _strip_moved(text: str, moved: str) -> str:
    if not moved:
        return text
    return text[len(moved):] if text.startswith(moved) else text.lstrip()


def _rng(seed: int, fact: Fact) -> random.Random:
    return random.Random(f"{seed}|{fact.relation}|{fact.subject}|{fact.prompt}")


def build_pairs(facts: Dataset | Mapping[str, Iterable[Fact]] | Iterable[Fact], tokenizer, *, seed: int = 0,
                prepend_bos: bool = True, partners: str = "within") -> list[FactPair]:
    """One :class:`FactPair` per fact, deterministic for ``seed``.

    ``partners="within"`` (default): counterfactual subjects come only from the facts passed in, so a caller
    that passes one split's facts (:func:`split_facts`) gets pairs whose clean *and* corrupted prompts all belong
    to that split. ``partners="none"``: no partner at all, every pair is a ``"noise"`` pair (one corruption type
    for facts that have no same-roles partner, e.g. a two-fact seed dataset).

    The corrupted prompt is another subject of the same relation whose prompt has the same roles
    (hence the same number of tokens and subject span) and a different answer, preferably with a
    different first answer token (see :attr:`FactPair.first_token_differs`); when the
    fact has an explicit counterfactual, partners answering it are preferred and the counterfactual
    is kept. Without a partner the pair uses ``corruption="noise"`` (corrupted prompt = clean prompt),
    and the counterfactual is the given one or another answer of the relation.
    """
    if partners not in ("within", "none"):
        raise DatasetError(f"partners={partners!r} is not supported; use 'within' (partners come from the facts "
                           f"passed in: pass one split's facts, see split_facts) or 'none' (noise pairs only)")
    flat = _flat(facts)
    if not flat:
        raise DatasetError("no facts to build pairs from; give a non-empty dataset")
    prepared = [prepare_fact(tokenizer, f, prepend_bos) for f in flat]
    groups: dict[tuple[str, tuple[str, ...] | str], list[_Prepared]] = defaultdict(list)  # key: roles or subject
    by_relation: dict[str, list[_Prepared]] = defaultdict(list)
    for p in prepared:
        groups[(p.fact.relation, p.roles if partners == "within" else p.fact.subject)].append(p)
        by_relation[p.fact.relation].append(p)
    return [_make_pair(p, groups[(p.fact.relation, p.roles if partners == "within" else p.fact.subject)],
                       by_relation[p.fact.relation], tokenizer, seed)
            for p in prepared]


def _make_pair(p: _Prepared, group: list[_Prepared], relation: list[_Prepared], tokenizer, seed: int) -> FactPair:
    rng = _rng(seed, p.fact)
    first = p.answer_tokens[0]
    given_cf = _strip_moved(p.fact.counterfactual, p.moved) if p.fact.counterfactual else None
    given_cf_first = answer_tokens(tokenizer, given_cf)[0] if given_cf else None
    others = [q for q in group if q.fact.subject != p.fact.subject and q.tokens != p.tokens
              and q.answer_tokens != p.answer_tokens]
    # prefer a different first answer token (single-token logit differences need it); years such as
    # "1789"/"1815" share their first digit and fall back to differing later tokens
    candidates = [q for q in others if q.answer_tokens[0] != first] or others
    if given_cf_first is not None:
        preferred = [q for q in candidates if q.answer_tokens[0] == given_cf_first]
        candidates = preferred or candidates
    if candidates:
        q = rng.choice(candidates)
        cf = given_cf if given_cf is not None else q.answer
        return FactPair(p.fact.relation, p.prompt, q.prompt, p.answer, cf, p.fact.subject, q.fact.subject,
                        "subject_swap", p.tokens, q.tokens, p.answer_tokens,
                        tuple(answer_tokens(tokenizer, cf)), p.span, list(p.roles))
    noise_cf = given_cf
    if noise_cf is None:
        other_answers = sorted({q.answer for q in relation if q.answer_tokens[0] != first})
        noise_cf = rng.choice(other_answers) if other_answers else None
    cf_tokens = tuple(answer_tokens(tokenizer, noise_cf)) if noise_cf is not None else ()
    return FactPair(p.fact.relation, p.prompt, p.prompt, p.answer, noise_cf, p.fact.subject, None, "noise",
                    p.tokens, p.tokens, p.answer_tokens, cf_tokens, p.span, list(p.roles))


# --------------------------------------------------------------------------- splits before pairs

DEFAULT_HELD_OUT_FRACTION = 0.4
"""Held-out share of :func:`split_facts` when neither ``n_held_out`` nor ``held_out_fraction`` is given
(8 held-out of 20 facts: the default run's ``held_out_facts`` / (``max_facts`` + ``held_out_facts``))."""


def _flat(facts) -> list[Fact]:
    if isinstance(facts, Mapping):
        return [f for items in facts.values() for f in items]
    return list(facts)


def pair_group_key(fact: Fact, tokenizer=None, prepend_bos: bool = True) -> tuple:
    """The key of the facts that ``fact`` can pair with in :func:`build_pairs`: ``(relation, token roles)``
    (same relation, same number of tokens and subject span). Without a tokenizer ``(relation, number of words
    of the subject)`` stands in for the roles (a proxy: the split is then only stratified by subject length)."""
    if tokenizer is None:
        return (fact.relation, len(fact.subject.split()))
    return (fact.relation, prepare_fact(tokenizer, fact, prepend_bos).roles)


def _answer_key(fact: Fact, tokenizer, prepend_bos: bool) -> tuple:
    if tokenizer is None:
        return (fact.answer.strip(),)
    return prepare_fact(tokenizer, fact, prepend_bos).answer_tokens


def _both_sides_pairable(counts: Sequence[int]) -> bool:
    """Whether a role group with these answer counts can give each side two facts with different answers
    (an answer with >= 2 facts can serve both sides, a singleton answer one side)."""
    return len(counts) >= 2 and sum(min(c, 2) for c in counts) >= 4


def _split_group(members: list[int], answer: Mapping[int, tuple], h: int) -> set[int]:
    """Held-out indices of one role group (``members`` already in seeded order), ``h`` of them. With
    ``2 <= h <= len - 2`` each side first gets two facts with different answers (from the largest answer
    buckets), then the held-out side is filled in seeded order."""
    if h <= 0:
        return set()
    if h >= len(members):
        return set(members)
    buckets: dict[tuple, list[int]] = {}
    for i in members:
        buckets.setdefault(answer[i], []).append(i)

    def take(side: list[int], avoid) -> tuple:
        a = max((b for b in buckets if buckets[b] and b != avoid), key=lambda b: len(buckets[b]))
        side.append(buckets[a].pop(0))
        return a

    held: list[int] = []
    disc: list[int] = []
    a = take(held, None)
    take(held, a)
    a = take(disc, None)
    take(disc, a)
    chosen = set(held) | set(disc)
    rest = [i for i in members if i not in chosen]
    return set(held) | set(rest[: h - 2])


def split_facts(facts: Dataset | Mapping[str, Iterable[Fact]] | Iterable[Fact], *, n_held_out: int | None = None,
                held_out_fraction: float | None = None, seed: int = 0, tokenizer=None,
                prepend_bos: bool = True, key=None) -> tuple[list[Fact], list[Fact]]:
    """Split known facts into ``(discovery, held_out)`` *before* any pairing, deterministic for ``seed``.

    Pair each split on its own (``build_pairs(discovery)``, ``build_pairs(held_out)``): counterfactual subjects
    then never cross the split, so no clean or corrupted prompt of one split appears in the other's pairs.

    Rule (stratified by role group, so both splits can form subject-swap pairs): facts are grouped by
    :func:`pair_group_key` (with a ``tokenizer``: relation and token roles, exactly the facts that can be
    partners; without one: relation and subject word count). Groups that cannot form any pair (one fact, or
    one answer only) go to discovery and do not count towards the held-out size. Every other group whose answers
    allow it (each side can get two facts with different answers) is split inside the group, with at least two
    facts on each side and two different answers on each side; smaller groups go whole to one side. The
    held-out size is ``n_held_out`` (one relation's facts only) or ``round(held_out_fraction * pairable facts)``
    per relation (default :data:`DEFAULT_HELD_OUT_FRACTION`), met as closely as whole groups allow. Order
    within a group is a seeded shuffle; both returned lists keep the input order. ``key`` (a callable
    fact -> hashable) replaces the group key, e.g. ``lambda f: f.relation`` for noise pairs, which need no
    partner (only another answer in the split).
    """
    flat = _flat(facts)
    if not flat:
        raise DatasetError("no facts to split; give a non-empty list of facts")
    if n_held_out is not None and held_out_fraction is not None:
        raise DatasetError("give n_held_out or held_out_fraction, not both")
    relations = list(dict.fromkeys(f.relation for f in flat))
    if n_held_out is not None:
        if isinstance(n_held_out, bool) or not isinstance(n_held_out, int) or n_held_out < 0:
            raise DatasetError(f"n_held_out must be a non-negative integer, got {n_held_out!r}")
        if len(relations) > 1:
            raise DatasetError(f"n_held_out needs one relation's facts, got {len(relations)} relations; split each "
                               f"relation on its own or give held_out_fraction")
    else:
        frac = DEFAULT_HELD_OUT_FRACTION if held_out_fraction is None else held_out_fraction
        if not 0.0 <= float(frac) <= 1.0:
            raise DatasetError(f"held_out_fraction must lie in [0, 1], got {frac!r}")
    keys = {i: (f.relation, key(f)) if key is not None else pair_group_key(f, tokenizer, prepend_bos)
            for i, f in enumerate(flat)}
    answers = {i: _answer_key(f, tokenizer, prepend_bos) for i, f in enumerate(flat)}
    held: set[int] = set()
    for rel in relations:
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(flat):
            if f.relation == rel:
                groups.setdefault(keys[i], []).append(i)
        pairable = {k: g for k, g in groups.items() if len({answers[i] for i in g}) >= 2}
        n_pairable = sum(len(g) for g in pairable.values())
        target = n_held_out if n_held_out is not None else int(float(frac) * n_pairable + 0.5)
        target = min(target, n_pairable)
        held |= _split_relation(rel, pairable, answers, target, seed, flat)
    discovery = [f for i, f in enumerate(flat) if i not in held]
    held_out = [f for i, f in enumerate(flat) if i in held]
    return discovery, held_out


def _split_relation(rel: str, groups: Mapping[tuple, list[int]], answers: Mapping[int, tuple], target: int,
                    seed: int, flat: Sequence[Fact]) -> set[int]:
    n_total = sum(len(g) for g in groups.values())
    if target <= 0 or not groups:
        return set()
    if target >= n_total:
        return {i for g in groups.values() for i in g}
    order = sorted(groups, key=lambda k: (-len(groups[k]), min(groups[k])))  # largest groups first, then dataset order
    members = {}
    for k in order:
        g = list(groups[k])
        random.Random(f"{seed}|split|{rel}|{flat[g[0]].subject}").shuffle(g)
        members[k] = g
    splittable = {k for k in order if _both_sides_pairable(
        list(_count(answers[i] for i in members[k]).values()))}
    frac = target / n_total
    h: dict[tuple, int] = {}
    for k in order:
        n = len(members[k])
        h[k] = min(max(int(frac * n + 0.5), 2), n - 2) if k in splittable else 0
    total = sum(h.values())
    for k in order:  # whole groups (too small to split) go where they bring the total closer to the target
        if k not in splittable and abs(total + len(members[k]) - target) < abs(total - target):
            h[k] = len(members[k])
            total += h[k]

    def allowed(k: tuple) -> list[int]:
        n = len(members[k])
        return [0, *range(2, n - 1), n] if k in splittable else [0, n]

    while total != target:  # move one group one allowed step at a time while that gets closer to the target
        best = None
        for rank, k in enumerate(order):
            vals = allowed(k)
            j = vals.index(h[k]) + (1 if target > total else -1)
            if not 0 <= j < len(vals):
                continue
            gain = abs(total - target) - abs(total + vals[j] - h[k] - target)
            keeps_both = k in splittable and 0 < vals[j] < len(members[k])
            cand = (gain, keeps_both, -rank, k, vals[j])
            if gain > 0 and (best is None or cand[:3] > best[:3]):
                best = cand
        if best is None:
            break
        total += best[4] - h[best[3]]
        h[best[3]] = best[4]
    held: set[int] = set()
    for k in order:
        held |= _split_group(members[k], answers, h[k])
    return held


def _count(items: Iterable) -> dict:
    out: dict = defaultdict(int)
    for x in items:
        out[x] += 1
    return out


# --------------------------------------------------------------------------- batching

def group_by_length(pairs: Iterable[FactPair]) -> dict[int, list[FactPair]]:
    """Pairs keyed by their number of tokens (pairs of one length stack without padding)."""
    out: dict[int, list[FactPair]] = defaultdict(list)
    for p in pairs:
        out[p.n_tokens].append(p)
    return dict(sorted(out.items()))


def stack_pairs(pairs: Sequence[FactPair]) -> dict[str, torch.Tensor]:
    """Tensors of equal-length pairs: ``clean``/``corrupted`` LongTensor ``[batch, pos]``, ``answer``/
    ``counterfactual`` LongTensor ``[batch]`` (first tokens; -1 where no counterfactual) and
    ``subject_mask`` BoolTensor ``[batch, pos]`` (the positions to noise for ``corruption="noise"``)."""
    if not pairs:
        raise DatasetError("stack_pairs needs at least one pair")
    lengths = {p.n_tokens for p in pairs}
    if len(lengths) != 1:
        raise DatasetError(f"pairs have different lengths {sorted(lengths)}; group them with group_by_length first")
    n = lengths.pop()
    mask = torch.zeros(len(pairs), n, dtype=torch.bool)
    for i, p in enumerate(pairs):
        mask[i, p.subject_span[0]:p.subject_span[1]] = True
    return {
        "clean": torch.tensor([p.clean_tokens for p in pairs], dtype=torch.long),
        "corrupted": torch.tensor([p.corrupted_tokens for p in pairs], dtype=torch.long),
        "answer": torch.tensor([p.answer_id for p in pairs], dtype=torch.long),
        "counterfactual": torch.tensor([p.counterfactual_id if p.counterfactual_tokens else -1 for p in pairs],
                                       dtype=torch.long),
        "subject_mask": mask,
    }


def informative_pair(pair: FactPair, tokenizer) -> FactPair | None:
    """The pair with answer tokens it shares with the counterfactual moved into both prompts.

    A logit difference of first answer tokens is zero when the two answers start alike (years: " 1789" and
    " 1492" both start with "1"). Appending the shared prefix to the clean *and* the corrupted prompt keeps the
    positions aligned and makes the first remaining answer tokens differ. Returns None when no counterfactual
    exists or one answer is a prefix of the other.
    """
    a, c = tuple(pair.answer_tokens), tuple(pair.counterfactual_tokens or ())
    if not c:
        return None
    k = 0
    while k < min(len(a), len(c)) and a[k] == c[k]:
        k += 1
    if k == 0:
        return pair
    if k == min(len(a), len(c)):
        return None
    prefix = a[:k]
    text = _decode(tokenizer, prefix)
    clean = tuple(pair.clean_tokens) + prefix
    roles = token_roles(len(clean), pair.subject_span, has_bos=bool(pair.roles) and pair.roles[0] == "bos")
    return replace(pair, clean_prompt=pair.clean_prompt + text, corrupted_prompt=pair.corrupted_prompt + text,
                   answer=_decode(tokenizer, a[k:]), counterfactual_answer=_decode(tokenizer, c[k:]),
                   clean_tokens=clean, corrupted_tokens=tuple(pair.corrupted_tokens) + prefix,
                   answer_tokens=a[k:], counterfactual_tokens=c[k:], roles=roles)
