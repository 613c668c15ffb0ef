"""Dataset loaders: built-in facts, seed format, rich JSON, ROME ``known_1000`` and CounterFact.

Every loader returns a :class:`~circuit_discovery.facts.types.Dataset`; :func:`load_dataset` detects the
format. Answers always get exactly one leading space (``"Paris"`` -> ``" Paris"``).

Formats
-------
**Rich** (``circuit_discovery.facts/v1``; the built-in ``data/relations.json`` and :meth:`Dataset.to_dict`)::

    {"format": "circuit_discovery.facts/v1",            # optional
     "relations": [                                      # or an object {name: {...}} without "name"
       {"name": "capital_city",                          # required
        "description": "Capital city of a country.",    # optional
        "template": "The capital of {} is",             # optional; "{}" marks the subject
        "default": true,                                 # optional; false: left out of load_builtin()'s default
                                                         # selection (still loadable by name)
        "facts": [                                       # required, non-empty
          {"subject": "France",                          # required
           "answer": " Paris",                           # required (leading space added if missing)
           "prompt": "The capital of France is",         # optional if the relation has a template
           "aliases": [" Paris, France"],                # optional
           "counterfactual": " Rome"}]}]}                # optional explicit wrong answer

A flat list of such facts, each with a ``"relation"`` field, is accepted as well.

**Seed**: ``{relation: [{"clean": "The Eiffel Tower is located in Paris",
"corrupted": "The Eiffel Tower is located in London", "subject": optional}]}``. The prompt is the longest
shared word prefix, the answer the rest of ``clean`` and the counterfactual the rest of ``corrupted``.
Without ``"subject"`` the subject is the part of the prompt that varies between the relation's entries
(:func:`infer_seed_relation`); ``corrupted`` may instead be the same template with another subject and its
answer. The inferred templates are in ``Relation.templates`` (:meth:`Dataset.template_lines`).

**ROME known_1000**: a list of ``{subject, attribute, template, prompt, relation_id, ...}``; the relation
name is a readable name for common Wikidata ids (:data:`WIKIDATA_RELATIONS`), else the id itself.

**CounterFact**: a list of ``{"requested_rewrite": {"prompt": "... {} ...", "subject", "relation_id",
"target_true": {"str"}, "target_new": {"str"}}}``; ``target_new`` becomes the counterfactual.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from circuit_discovery.facts.types import Dataset, DatasetError, Fact, Relation, RelationTemplate, select_relations

FORMAT_ID = "circuit_discovery.facts/v1"

WIKIDATA_RELATIONS: dict[str, str] = {
    "P17": "country", "P19": "place_of_birth", "P20": "place_of_death", "P27": "citizenship",
    "P30": "continent", "P36": "capital", "P37": "official_language", "P39": "position_held",
    "P101": "field_of_work", "P103": "native_language", "P106": "occupation", "P108": "employer",
    "P127": "owned_by", "P131": "located_in_region", "P136": "genre", "P138": "named_after",
    "P140": "religion", "P159": "headquarters_location", "P176": "manufacturer", "P178": "developer",
    "P190": "twin_city", "P264": "record_label", "P276": "location", "P364": "original_language",
    "P407": "language_of_work", "P413": "position_played", "P449": "original_network",
    "P463": "member_of", "P495": "country_of_origin", "P641": "sport", "P740": "formation_location",
    "P937": "work_location", "P1303": "instrument", "P1412": "languages_spoken",
}
"""Readable relation names for the Wikidata property ids used by ROME's datasets."""

_FACT_SCHEMA = {
    "type": "object",
    "required": ["subject", "answer"],
    "properties": {
        "subject": {"type": "string", "minLength": 1},
        "answer": {"type": "string", "minLength": 1},
        "prompt": {"type": "string", "minLength": 1},
        "relation": {"type": "string", "minLength": 1},
        "aliases": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "counterfactual": {"type": "string", "minLength": 1},
    },
}
_RELATION_BODY = {
    "type": "object",
    "required": ["facts"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "template": {"type": "string", "pattern": r"\{\}"},
        "default": {"type": "boolean"},
        "facts": {"type": "array", "items": _FACT_SCHEMA},
    },
}
RICH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["relations"],
    "properties": {
        "format": {"const": FORMAT_ID},
        "relations": {
            "oneOf": [
                {"type": "array", "items": {**_RELATION_BODY, "required": ["name", "facts"]}},
                {"type": "object", "additionalProperties": _RELATION_BODY},
            ]
        },
    },
}
"""JSON schema of the rich format (validated with :mod:`jsonschema`)."""

_FORMAT_HELP = "rich {'relations': [...]}, seed {relation: [{'clean', 'corrupted'}]}, ROME known_1000 or CounterFact"


def _space(answer: str) -> str:
    """Exactly one leading space."""
    return " " + answer.strip()


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


# --------------------------------------------------------------------------- built-in / rich

def load_builtin(relations: str | Sequence[str] | None = None, *, include_non_default: bool = False) -> Dataset:
    """The built-in dataset (``facts/data/relations.json``), optionally only ``relations``.

    Without ``relations`` the default selection is returned: relations marked ``"default": false`` (fewer than
    20 facts that the default model, Gemma 3 270M, knows at k = 1; see benchmarks/results/known_facts.json) are
    left out unless ``include_non_default``. Naming such a relation in ``relations`` loads it."""
    text = resources.files("circuit_discovery.facts").joinpath("data/relations.json").read_text("utf-8")
    ds = load_rich(json.loads(text))
    if relations is not None:
        return select_relations(ds, relations)
    if include_non_default:
        return ds
    return select_relations(ds, [n for n, r in ds.relations.items() if r.default])


def builtin_relations(include_non_default: bool = False) -> list[str]:
    """Names of the built-in relations (the default selection unless ``include_non_default``)."""
    return load_builtin(include_non_default=include_non_default).relation_names


def load_rich(obj: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Dataset:
    """Load the rich format (an object with ``relations``, or a flat list of facts with ``relation``)."""
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return _load_flat(obj)
    try:
        jsonschema.validate(obj, RICH_SCHEMA)
    except jsonschema.ValidationError as err:
        best = jsonschema.exceptions.best_match([err]) or err
        where = "/".join(str(p) for p in best.absolute_path) or "top level"
        raise DatasetError(f"rich dataset invalid at {where}: {best.message.splitlines()[0]}; "
                           f"see the format in circuit_discovery.facts.loaders") from None
    rels = obj["relations"]
    items = rels if isinstance(rels, list) else [{"name": k, **v} for k, v in rels.items()]
    facts: dict[str, list[Fact]] = {}
    meta: dict[str, Relation] = {}
    for r in items:
        name, template = r["name"], r.get("template")
        if name in facts:
            raise DatasetError(f"relation {name!r} appears twice; merge its facts into one entry")
        meta[name] = Relation(name, r.get("description", ""), template, bool(r.get("default", True)))
        facts[name] = [_rich_fact(name, template, f, i) for i, f in enumerate(r["facts"])]
    return Dataset(facts, meta)


def _rich_fact(relation: str, template: str | None, f: Mapping[str, Any], i: int) -> Fact:
    prompt = f.get("prompt")
    if prompt is None:
        if template is None:
            raise DatasetError(f"relation {relation!r} fact {i}: no 'prompt' and the relation has no 'template'; "
                               f"add one")
        prompt = _fill(template, f["subject"])
    if f["subject"] not in prompt:
        raise DatasetError(f"relation {relation!r} fact {i}: subject {f['subject']!r} does not occur in "
                           f"prompt {prompt!r}")
    cf = f.get("counterfactual")
    return Fact(relation, f["subject"], prompt, _space(f["answer"]),
                tuple(_space(a) for a in f.get("aliases", ())), _space(cf) if cf else None, template)


def _load_flat(items: Sequence[Mapping[str, Any]]) -> Dataset:
    schema = {"type": "array", "items": {**_FACT_SCHEMA, "required": ["relation", "subject", "answer", "prompt"]}}
    try:
        jsonschema.validate(list(items), schema)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise DatasetError(f"fact list invalid at {where}: {err.message.splitlines()[0]}; each fact needs "
                           f"relation, subject, prompt and answer") from None
    return Dataset([_rich_fact(f["relation"], None, f, i) for i, f in enumerate(items)])


# --------------------------------------------------------------------------- seed format

_WORD = re.compile(r"\S+")
_CONNECTORS = {"of", "the", "de", "da", "van", "von", "and", "del", "la", "le", "du", "di", "der"}
_STOP_CAPS = {"The", "A", "An", "In", "On", "At", "It", "This", "That", "What", "Which", "Who", "Where",
              "When", "How", "Its", "His", "Her", "Their", "My", "Our", "Your"}


def _ends_sentence(word: str) -> bool:
    if word[-1:] in "?!,;:":
        return True
    stem = word[:-1]
    return word.endswith(".") and len(stem) > 1 and "." not in stem  # "Liberty." ends, "J.R.R." / "F." do not


def guess_subject(prompt: str) -> str | None:
    """The longest run of capitalised words (inner connectors like "of" allowed) of ``prompt``.

    Runs made only of function words ("The", "In") do not count. Returns None when there is none.
    """
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(prompt)]
    best: tuple[int, int, int] | None = None  # (start char, end char, number of content words)
    i = 0
    while i < len(words):
        if not words[i][2][:1].isupper():
            i += 1
            continue
        j = i + 1
        while j < len(words):
            if _ends_sentence(words[j - 1][2]):
                break
            w = words[j][2]
            if (w[:1].isupper() or w[:1].isdigit()
                    or w in _CONNECTORS and j + 1 < len(words) and words[j + 1][2][:1].isupper()):
                j += 1
            else:
                break
        k = i
        while k < j - 1 and ((words[k][2] in _STOP_CAPS and words[k][2] != "The") or words[k][2][:1].isdigit()):
            k += 1  # "In Paris" -> "Paris"; "The Eiffel Tower" keeps its article
        content = [w for _, _, w in words[k:j] if w.strip(".,;:") not in _STOP_CAPS]
        if content:
            text = prompt[words[k][0]:words[j - 1][1]].rstrip(".,;:?!'\"")
            if best is None or len(content) > best[2]:
                best = (words[k][0], words[k][0] + len(text), len(content))
        i = j
    return None if best is None else prompt[best[0]:best[1]]


def split_seed(clean: str, corrupted: str) -> tuple[str, str, str]:
    """``(prompt, answer, counterfactual)`` from a clean/corrupted sentence pair sharing a word prefix."""
    cw = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(clean)]
    kw = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(corrupted)]
    n = 0
    while n < min(len(cw), len(kw)) and cw[n][2] == kw[n][2]:
        n += 1
    if n == 0:
        raise DatasetError(f"clean {clean!r} and corrupted {corrupted!r} share no leading words; "
                           f"they must be the same prompt with different endings")
    if n == len(cw) or n == len(kw):
        raise DatasetError(f"clean {clean!r} and corrupted {corrupted!r} have no differing ending; "
                           f"end each with its answer, e.g. '... located in Paris' / '... located in London'")
    prompt = clean[:cw[n - 1][1]]
    return prompt, _space(clean[cw[n][0]:]), _space(corrupted[kw[n][0]:])


def load_seed(obj: Mapping[str, Any]) -> Dataset:
    """Load the seed format ``{relation: [{"clean": ..., "corrupted": ..., "subject"?: ...}]}``.

    Each relation's subjects and templates are inferred from the data (see :func:`infer_seed_relation`); the
    result records them in ``Relation.templates`` (printable with :meth:`Dataset.template_lines`).
    """
    if not isinstance(obj, Mapping) or not obj:
        raise DatasetError("seed dataset is empty: give {relation: [{'clean': ..., 'corrupted': ...}, ...]}")
    facts: dict[str, list[Fact]] = {}
    meta: dict[str, Relation] = {}
    for relation, entries in obj.items():
        facts[relation], meta[relation] = infer_seed_relation(relation, entries)
    return Dataset(facts, meta)


@dataclass
class _Entry:
    """One seed entry read as prompt + answer; ``span`` is the subject's character range in ``prompt``."""

    index: int
    prompt: str
    answer: str
    counterfactual: str
    subject: str | None = None
    span: tuple[int, int] | None = None
    source: str = ""


def infer_seed_relation(relation: str, entries: Any) -> tuple[list[Fact], Relation]:
    """The facts and relation metadata of one seed relation.

    Two entry shapes are read:

    * **answer swap** (the README's): ``corrupted`` is ``clean`` with another answer. The prompt is the
      longest shared word prefix of the two. The subject is the part of the prompt that varies between the
      relation's entries: prompts are grouped by sentence template (agglomerative grouping that keeps a split
      only where it shares more template words, see :func:`_group_prompts`) and, within a group, the common
      word prefix and suffix are the template. Quotes, brackets, ``'s`` and closing punctuation shared by every
      subject of a group move to the template.
    * **subject swap**: ``corrupted`` is the same template with another subject and its answer (``"The Eiffel
      Tower is located in Paris"`` / ``"The Colosseum is located in Rome"``). Used when every entry of the
      relation fits one template ``prefix {subject} middle {answer}`` whose clean and corrupted subjects and
      answers both differ; the corrupted answer becomes the counterfactual.

    An entry's ``subject`` field is taken as given and its template is reused for entries that fit it. Only a
    relation with a single entry falls back to :func:`guess_subject`. Raises :class:`DatasetError` when a
    subject cannot be determined: every entry with the same prompt, or an entry that shares no template
    with any other.
    """
    if not isinstance(entries, list):
        raise DatasetError(f"seed relation {relation!r} must map to a list of {{'clean', 'corrupted'}} objects")
    if not entries:
        raise DatasetError(f"seed relation {relation!r} is empty: give at least one {{'clean', 'corrupted'}} entry")
    for i, e in enumerate(entries):
        if not (isinstance(e, Mapping) and isinstance(e.get("clean"), str) and isinstance(e.get("corrupted"), str)):
            raise DatasetError(f"seed entry {i} of {relation!r} is malformed ({_short(e)}); "
                               f"each entry needs string fields 'clean' and 'corrupted'")
        s = e.get("subject")
        if s is not None and (not isinstance(s, str) or not s.strip()):
            raise DatasetError(f"seed entry {i} of {relation!r}: 'subject' must be a non-empty string, got {s!r}")
    read = _subject_swap_entries(entries)
    swapped = read is not None
    if read is None:
        read = []
        for i, e in enumerate(entries):
            try:
                prompt, answer, cf = split_seed(e["clean"], e["corrupted"])
            except DatasetError as err:
                raise DatasetError(f"seed entry {i} of {relation!r}: {err}") from None
            read.append(_Entry(i, prompt, answer, cf))
    for e, raw in zip(read, entries):
        if raw.get("subject") is not None:
            e.subject = raw["subject"].strip()
    _infer_subjects(relation, read, swapped)
    facts: list[Fact] = []
    recorded: dict[str, list[str]] = {}
    for e in read:
        assert e.span is not None  # _infer_subjects set every span
        a, b = e.span
        template = e.prompt[:a] + "{}" + e.prompt[b:]
        facts.append(Fact(relation, e.prompt[a:b], e.prompt, e.answer, counterfactual=e.counterfactual,
                          template=template))
        sources = recorded.setdefault(template, [])
        if e.source not in sources:
            sources.append(e.source)
    templates = tuple(RelationTemplate(t, ", ".join(s)) for t, s in recorded.items())
    common = templates[0].template if len(templates) == 1 else None
    return facts, Relation(relation, "", common, True, templates)


def _words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]


def _common_prefix_len(seqs: Sequence[Sequence[str]]) -> int:
    n = 0
    while all(n < len(s) for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _subject_swap_entries(entries: Sequence[Mapping[str, Any]]) -> list[_Entry] | None:
    """The entries read as subject swaps (``prefix {subject} middle {answer}`` with a shared prefix and middle for
    all clean and corrupted sentences, and differing subjects and answers in every entry), or None."""
    texts = [t for e in entries for t in (e["clean"], e["corrupted"])]
    words = [_words(t) for t in texts]
    tokens = [[w for _, _, w in ws] for ws in words]
    p = _common_prefix_len(tokens)
    rest = [t[p:] for t in tokens]
    if min(len(r) for r in rest) < 3:
        return None
    middle = None
    for n in range(len(rest[0]) - 2, 0, -1):
        found = []
        for a in range(1, len(rest[0]) - n):
            run = tuple(rest[0][a:a + n])
            if run not in found and all(len(_inner_positions(r, run)) == 1 for r in rest):
                found.append(run)
        if len(found) > 1:
            return None  # two different middles fit equally well
        if found:
            middle = found[0]
            break
    if middle is None:
        return None
    out = []
    for i in range(len(entries)):
        parts = []
        for t in (2 * i, 2 * i + 1):
            a = p + _inner_positions(rest[t], middle)[0]
            ws, text = words[t], texts[t]
            subject, answer = (ws[p][0], ws[a - 1][1]), text[ws[a + len(middle)][0]:]
            parts.append((text[:ws[a + len(middle) - 1][1]], subject, answer))
        (prompt, span, answer), (_, (ka, kb), cf) = parts
        if prompt[span[0]:span[1]] == texts[2 * i + 1][ka:kb] or answer.strip() == cf.strip():
            return None  # not a subject swap: same subject, or the same answer
        out.append(_Entry(i, prompt, _space(answer), _space(cf), span=span, source="aligned with corrupted"))
    _trim_punctuation(out)
    return out


def _inner_positions(seq: Sequence[str], run: tuple[str, ...]) -> list[int]:
    """Start positions of ``run`` in ``seq`` with at least one word before and after it."""
    n = len(run)
    return [a for a in range(1, len(seq) - n) if tuple(seq[a:a + n]) == run]


def _infer_subjects(relation: str, entries: list[_Entry], swapped: bool) -> None:
    """Set ``span`` and ``source`` of every entry (see :func:`infer_seed_relation`)."""
    fix = f"add a 'subject' field to each entry of relation {relation!r}"
    explicit: list[tuple[str, str]] = []
    for e in entries:
        if e.subject is None:
            continue
        a = e.prompt.find(e.subject)
        if a < 0:
            raise DatasetError(f"seed entry {e.index} of {relation!r}: subject {e.subject!r} does not occur in the "
                               f"prompt {e.prompt!r}; give a 'subject' that is part of the prompt")
        e.span, e.source = (a, a + len(e.subject)), "explicit"
        explicit.append((e.prompt[:a], e.prompt[a + len(e.subject):]))
    todo = [e for e in entries if e.span is None]
    for e in todo:  # an explicit entry's template is reused by the entries that fit it
        fits = {(len(pre), len(e.prompt) - len(post)) for pre, post in dict.fromkeys(explicit)
                if e.prompt.startswith(pre) and e.prompt.endswith(post) and len(e.prompt) > len(pre) + len(post)}
        fits = {(a, b) for a, b in fits if e.prompt[a:b].strip() == e.prompt[a:b]}
        if len(fits) == 1:
            e.span, e.source = fits.pop(), "explicit"
    todo = [e for e in todo if e.span is None]
    if not todo or swapped:
        return
    if len(entries) == 1:
        e = entries[0]
        subject = guess_subject(e.prompt)
        if subject is None:
            raise DatasetError(f"seed relation {relation!r}: cannot find the subject of its only entry in "
                               f"{e.prompt!r} (no other entry to align it with); add a 'subject' field to the entry")
        a = e.prompt.find(subject)
        e.span, e.source = (a, a + len(subject)), "single-entry heuristic"
        return
    prompts = list(dict.fromkeys(e.prompt for e in todo))
    if len(prompts) == 1:
        which = "every entry" if len(todo) == len(entries) else "every entry without a 'subject' field"
        raise DatasetError(f"seed relation {relation!r}: the subject is the same for {which} (all have the prompt "
                           f"{prompts[0]!r}), so it cannot be inferred by aligning them; {fix}")
    for group in _group_prompts(prompts):
        members = [e for e in todo if e.prompt in group]
        if len(group) == 1:
            raise DatasetError(f"seed relation {relation!r}: entry {members[0].index} ({group[0]!r}) shares no "
                               f"sentence template with the other entries, so its subject cannot be inferred; {fix}")
        toks = [[w for _, _, w in _words(p)] for p in group]
        pre = _common_prefix_len(toks)
        post = _common_prefix_len([t[::-1] for t in toks])
        for e in members:
            ws = _words(e.prompt)
            e.span, e.source = (ws[pre][0], ws[len(ws) - post - 1][1]), "aligned"
        _trim_punctuation(members)


def _group_prompts(prompts: Sequence[str]) -> list[list[str]]:
    """Group distinct prompts by sentence template.

    A group's template is its members' common word prefix and suffix; it must leave at least one word between
    them in every member. Starting from single prompts, the two groups whose merged template has the most words
    are merged, as long as that template keeps more than half the template words of the smaller of the two
    (a single prompt counts all its words but one). So subjects that share words ("The Eiffel Tower", "The
    Leaning Tower", "The Colosseum") end up in one group whose template is the words all share, while sentence
    shapes that share only a few edge words ("The capital of {} is" / "The largest city of {} is") stay apart.
    """
    toks = [[w for _, _, w in _words(p)] for p in prompts]
    groups: list[dict | None] = [{"members": [i], "pre": t, "post": t[::-1], "min": len(t), "t": len(t) - 1}
                                 for i, t in enumerate(toks)]

    def merged(a: dict, b: dict) -> dict | None:
        pre = a["pre"][:_common_prefix_len([a["pre"], b["pre"]])]
        post = a["post"][:_common_prefix_len([a["post"], b["post"]])]
        low, t = min(a["min"], b["min"]), len(pre) + len(post)
        if t > low - 1 or 2 * t <= min(a["t"], b["t"]):
            return None  # a member would keep no subject word, or the shared template is too short
        return {"members": a["members"] + b["members"], "pre": pre, "post": post, "min": low, "t": t}

    candidates: dict[tuple[int, int], dict] = {}

    def consider(i: int, j: int) -> None:
        gi, gj = groups[i], groups[j]
        assert gi is not None and gj is not None  # only groups not merged yet are compared
        m = merged(gi, gj)
        if m is not None:
            candidates[(i, j)] = m

    for j in range(len(groups)):
        for i in range(j):
            consider(i, j)
    while candidates:
        (i, j), m = max(candidates.items(), key=lambda kv: (kv[1]["t"], -kv[0][0], -kv[0][1]))
        groups[i] = groups[j] = None
        candidates = {k: v for k, v in candidates.items() if i not in k and j not in k}
        groups.append(m)
        for k in range(len(groups) - 1):
            if groups[k] is not None:
                consider(k, len(groups) - 1)
    return [[prompts[k] for k in sorted(g["members"])] for g in groups if g is not None]


_OPENING = "\"'“‘([«"
_CLOSING = re.compile(r"(?:['’]s)?[?!,;:\"'”’)\]»]*\Z")


def _trim_punctuation(entries: Sequence[_Entry]) -> None:
    """Move opening quotes/brackets and ``'s`` or closing punctuation shared by every subject into the template."""
    if len(entries) < 2:
        return
    spans: list[tuple[int, int]] = []
    for e in entries:
        assert e.span is not None  # set by _infer_subjects before trimming
        spans.append(e.span)
    subjects = [e.prompt[a:b] for e, (a, b) in zip(entries, spans)]
    lead = 0
    first = os.path.commonprefix(subjects)
    while lead < len(first) and first[lead] in _OPENING:
        lead += 1
    last = os.path.commonprefix([s[::-1] for s in subjects])[::-1]
    closing = _CLOSING.search(last)
    assert closing is not None  # the pattern matches the empty string at the end
    trail = len(closing.group())
    trimmed = [s[lead:len(s) - trail] for s in subjects]
    if all(t and t.strip() == t for t in trimmed):
        for e, (a, b) in zip(entries, spans):
            e.span = (a + lead, b - trail)


def check_subject_tokens(dataset: Dataset, tokenizer) -> None:
    """Raise :class:`DatasetError` for the first fact whose subject does not start and end on token boundaries of
    its prompt (whitespace before the subject may share its first token). Needs a tokenizer with offsets
    (``return_offsets_mapping``, e.g. a Hugging Face fast tokenizer)."""
    for f in dataset.facts:
        t = f.template
        if t and "{}" in t and t.replace("{}", f.subject, 1) == f.prompt:
            start = t.index("{}")
        else:
            start = f.prompt.find(f.subject)
        end = start + len(f.subject)
        try:
            offsets = tokenizer(f.prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except (TypeError, KeyError, NotImplementedError, ValueError):
            raise DatasetError("check_subject_tokens needs a tokenizer with offsets (a Hugging Face fast tokenizer); "
                               "pass one such as model.tokenizer") from None
        spans = [(int(a), int(b)) for a, b in offsets if b > a]
        first = next((a for a, b in spans if b > start), None)
        last = next((b for a, b in reversed(spans) if a < end), None)
        if first is None or last is None or f.prompt[first:start].strip() or last != end:
            raise DatasetError(f"relation {f.relation!r}: subject {f.subject!r} of {f.prompt!r} does not start and end "
                               f"on token boundaries; give a 'subject' field that covers whole words")


def _short(x: Any) -> str:
    s = json.dumps(x, ensure_ascii=False, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


# --------------------------------------------------------------------------- ROME formats

def load_known_1000(obj: Sequence[Mapping[str, Any]] | str | os.PathLike, *, readable_names: bool = True) -> Dataset:
    """Load ROME's ``known_1000.json`` (list or path). Relation names from :data:`WIKIDATA_RELATIONS`."""
    items: Sequence[Mapping[str, Any]] = _read_json(obj) if isinstance(obj, (str, os.PathLike)) else obj
    facts = []
    for i, e in enumerate(items):
        try:
            subject, attribute, prompt, rid = e["subject"], e["attribute"], e["prompt"], e["relation_id"]
        except (KeyError, TypeError):
            raise DatasetError(f"known_1000 entry {i} lacks subject/attribute/prompt/relation_id "
                               f"({_short(e)})") from None
        if subject not in prompt:
            raise DatasetError(f"known_1000 entry {i}: subject {subject!r} not in prompt {prompt!r}")
        name = WIKIDATA_RELATIONS.get(rid, rid) if readable_names else rid
        facts.append(Fact(name, subject, prompt, _space(attribute), template=prompt.replace(subject, "{}", 1)))
    return Dataset(facts)


def load_counterfact(obj: Sequence[Mapping[str, Any]] | str | os.PathLike, *, readable_names: bool = True) -> Dataset:
    """Load CounterFact records (``requested_rewrite``); ``target_new`` is kept as the counterfactual."""
    items: Sequence[Mapping[str, Any]] = _read_json(obj) if isinstance(obj, (str, os.PathLike)) else obj
    facts = []
    for i, e in enumerate(items):
        try:
            rw = e["requested_rewrite"]
            template, subject = rw["prompt"], rw["subject"]
            true, new = rw["target_true"]["str"], rw["target_new"]["str"]
        except (KeyError, TypeError):
            raise DatasetError(f"CounterFact record {i} lacks requested_rewrite prompt/subject/target_true/target_new "
                               f"({_short(e)})") from None
        if "{}" not in template:
            raise DatasetError(f"CounterFact record {i}: prompt {template!r} has no '{{}}' for the subject")
        rid = rw.get("relation_id", "counterfact")
        name = WIKIDATA_RELATIONS.get(rid, rid) if readable_names else rid
        facts.append(Fact(name, subject, _fill(template, subject), _space(true), counterfactual=_space(new),
                          template=template))
    return Dataset(facts)


# --------------------------------------------------------------------------- detection

def _read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file {str(p)!r} not found; give an existing JSON file or 'builtin'")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"dataset file {str(p)!r} is not valid JSON ({err}); give a JSON file in one of: "
                           f"{_FORMAT_HELP}") from None


def detect_format(obj: Any) -> str:
    """One of ``rich``, ``rich_flat``, ``seed``, ``known_1000``, ``counterfact``."""
    if isinstance(obj, Mapping):
        if "relations" in obj:
            return "rich"
        if obj and all(isinstance(v, list) for v in obj.values()):
            return "seed"
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and obj:
        first = obj[0]
        if isinstance(first, Mapping):
            if "requested_rewrite" in first:
                return "counterfact"
            if {"subject", "attribute", "relation_id"} <= set(first):
                return "known_1000"
            if {"relation", "subject", "answer"} <= set(first):
                return "rich_flat"
    if not obj:
        raise DatasetError(f"the dataset is empty: give at least one fact ({_FORMAT_HELP})")
    raise DatasetError(f"unrecognised dataset format ({_short(obj)}); use {_FORMAT_HELP}")


def load_dataset(obj_or_path: Any = "builtin", relations: str | Sequence[str] | None = None) -> Dataset:
    """Load a dataset from a path, a parsed JSON object, an existing :class:`Dataset` or ``"builtin"``.

    ``relations`` optionally restricts to those relation names (unknown names raise :class:`DatasetError`).
    """
    obj = obj_or_path
    if isinstance(obj, Dataset):
        ds = obj
    elif obj is None or (isinstance(obj, str) and obj == "builtin"):
        return load_builtin(relations)  # named relations may include ones outside the default selection
    else:
        if isinstance(obj, (str, os.PathLike)):
            obj = _read_json(obj)
        fmt = detect_format(obj)
        loaders: dict[str, Callable[[Any], Dataset]] = {
            "rich": load_rich, "rich_flat": load_rich, "seed": load_seed,
            "known_1000": load_known_1000, "counterfact": load_counterfact}
        ds = loaders[fmt](obj)
    return ds if relations is None else select_relations(ds, relations)
