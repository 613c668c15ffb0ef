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
Without ``"subject"`` the subject is guessed as the longest capitalised word run of the prompt.

**ROME known_1000**: a list of ``{subject, attribute, template, prompt, relation_id, ...}``; the relation
name is a readable name for common Wikidata ids (:data:`WIKIDATA_RELATIONS`), else the id itself.

**CounterFact**: a list of ``{"requested_rewrite": {"prompt": "... {} ...", "subject", "relation_id",
"target_true": {"str"}, "target_new": {"str"}}}``; ``target_new`` becomes the counterfactual.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from circuit_discovery.facts.types import Dataset, DatasetError, Fact, Relation, select_relations

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
            raise DatasetError(f"relation {relation!r} fact {i}: no 'prompt' and the relation has no 'template'; add one")
        prompt = _fill(template, f["subject"])
    if f["subject"] not in prompt:
        raise DatasetError(f"relation {relation!r} fact {i}: subject {f['subject']!r} does not occur in prompt {prompt!r}")
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
            if w[:1].isupper() or w[:1].isdigit():
                j += 1
            elif w in _CONNECTORS and j + 1 < len(words) and words[j + 1][2][:1].isupper():
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
    """Load the seed format ``{relation: [{"clean": ..., "corrupted": ..., "subject"?: ...}]}``."""
    if not isinstance(obj, Mapping) or not obj:
        raise DatasetError("seed dataset is empty: give {relation: [{'clean': ..., 'corrupted': ...}, ...]}")
    facts: dict[str, list[Fact]] = {}
    for relation, entries in obj.items():
        if not isinstance(entries, list):
            raise DatasetError(f"seed relation {relation!r} must map to a list of {{'clean', 'corrupted'}} objects")
        out = []
        for i, e in enumerate(entries):
            if not (isinstance(e, Mapping) and isinstance(e.get("clean"), str) and isinstance(e.get("corrupted"), str)):
                raise DatasetError(f"seed entry {i} of {relation!r} is malformed ({_short(e)}); "
                                   f"each entry needs string fields 'clean' and 'corrupted'")
            prompt, answer, cf = split_seed(e["clean"], e["corrupted"])
            subject = e.get("subject") or guess_subject(prompt)
            if not subject or subject not in prompt:
                raise DatasetError(f"seed entry {i} of {relation!r}: cannot find the subject in {prompt!r}; "
                                   f"add a 'subject' field")
            template = prompt.replace(subject, "{}", 1)
            out.append(Fact(relation, subject, prompt, answer, counterfactual=cf, template=template))
        facts[relation] = out
    return Dataset(facts)


def _short(x: Any) -> str:
    s = json.dumps(x, ensure_ascii=False, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


# --------------------------------------------------------------------------- ROME formats

def load_known_1000(obj: Sequence[Mapping[str, Any]] | str | os.PathLike, *, readable_names: bool = True) -> Dataset:
    """Load ROME's ``known_1000.json`` (list or path). Relation names from :data:`WIKIDATA_RELATIONS`."""
    if isinstance(obj, (str, os.PathLike)):
        obj = _read_json(obj)
    facts = []
    for i, e in enumerate(obj):
        try:
            subject, attribute, prompt, rid = e["subject"], e["attribute"], e["prompt"], e["relation_id"]
        except (KeyError, TypeError):
            raise DatasetError(f"known_1000 entry {i} lacks subject/attribute/prompt/relation_id ({_short(e)})") from None
        if subject not in prompt:
            raise DatasetError(f"known_1000 entry {i}: subject {subject!r} not in prompt {prompt!r}")
        name = WIKIDATA_RELATIONS.get(rid, rid) if readable_names else rid
        facts.append(Fact(name, subject, prompt, _space(attribute), template=prompt.replace(subject, "{}", 1)))
    return Dataset(facts)


def load_counterfact(obj: Sequence[Mapping[str, Any]] | str | os.PathLike, *, readable_names: bool = True) -> Dataset:
    """Load CounterFact records (``requested_rewrite``); ``target_new`` is kept as the counterfactual."""
    if isinstance(obj, (str, os.PathLike)):
        obj = _read_json(obj)
    facts = []
    for i, e in enumerate(obj):
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
        ds = {"rich": load_rich, "rich_flat": load_rich, "seed": load_seed,
              "known_1000": load_known_1000, "counterfact": load_counterfact}[fmt](obj)
    return ds if relations is None else select_relations(ds, relations)
