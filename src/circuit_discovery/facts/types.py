"""Core value types of :mod:`circuit_discovery.facts`: facts, fact pairs, relations and datasets."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from circuit_discovery.errors import CircuitDiscoveryError

ROLES: tuple[str, ...] = (
    "bos", "subject_first", "subject_middle", "subject_last", "relation_first", "relation", "last",
)
"""Position roles, see docs/ARCHITECTURE.md (aligned across the prompts of one relation)."""

Corruption = Literal["subject_swap", "noise"]


class DatasetError(CircuitDiscoveryError, ValueError):
    """Bad dataset input; the message is one line and says what to do."""


@dataclass(frozen=True)
class Fact:
    """One fact: ``prompt`` (the subject filled into a relation template) completed by ``answer``.

    ``answer`` carries its leading space (``" Paris"``). ``aliases`` are other accepted answers.
    ``counterfactual`` is an optional, explicitly given wrong answer (seed format, CounterFact);
    ``template`` the relation template with ``"{}"`` for the subject, where known.
    """

    relation: str
    subject: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()
    counterfactual: str | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        for name in ("relation", "subject", "prompt", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DatasetError(
                    f"fact {self.prompt!r}: field {name!r} must be a non-empty string, got {value!r}"
                )
        if not isinstance(self.aliases, tuple):
            object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def answers(self) -> tuple[str, ...]:
        """The answer followed by its aliases (no duplicates)."""
        return tuple(dict.fromkeys((self.answer, *self.aliases)))

    def to_dict(self) -> dict:
        d: dict = {"subject": self.subject, "prompt": self.prompt, "answer": self.answer}
        if self.aliases:
            d["aliases"] = list(self.aliases)
        if self.counterfactual is not None:
            d["counterfactual"] = self.counterfactual
        return d


@dataclass(frozen=True)
class FactPair:
    """A clean prompt and its corrupted twin, tokenized, for patching experiments.

    Token sequences are tuples of token ids including BOS where the tokenizer has one:
    ``clean_tokens``/``corrupted_tokens``: ``[pos]`` (same length), ``answer_tokens``/
    ``counterfactual_tokens``: ``[n_answer_tokens]`` (tokenized without BOS).
    ``subject_span`` is the half-open ``(start, end)`` token range of the subject in the clean prompt;
    ``roles[i]`` is the role of position ``i`` (see :data:`ROLES`). With ``corruption="subject_swap"``
    the corrupted prompt is another subject of the same relation with the same roles and a different
    first answer token; with ``corruption="noise"`` it equals the clean prompt and the subject
    embeddings are to be noised (``corrupted_subject`` is ``None``). ``clean_prompt + answer`` is the
    full fact text; a whitespace-only leading answer token (Gemma splits ``" 1789"`` into
    ``"▁" "1" "7" "8" "9"``) is moved to the end of the prompt so the first answer token is informative.
    ``counterfactual_answer`` is ``None`` only when the relation offers no other answer.
    """

    relation: str
    clean_prompt: str
    corrupted_prompt: str
    answer: str
    counterfactual_answer: str | None
    subject: str
    corrupted_subject: str | None
    corruption: Corruption
    clean_tokens: tuple[int, ...]
    corrupted_tokens: tuple[int, ...]
    answer_tokens: tuple[int, ...]
    counterfactual_tokens: tuple[int, ...]
    subject_span: tuple[int, int]
    roles: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.clean_tokens)

    @property
    def answer_id(self) -> int:
        """First answer token id (what single-token metrics use)."""
        return self.answer_tokens[0]

    @property
    def counterfactual_id(self) -> int | None:
        return self.counterfactual_tokens[0] if self.counterfactual_tokens else None

    @property
    def first_token_differs(self) -> bool:
        """Whether answer and counterfactual differ in their first token (single-token metrics need it)."""
        return bool(self.counterfactual_tokens) and self.counterfactual_tokens[0] != self.answer_tokens[0]

    def role_positions(self, role: str) -> list[int]:
        """Token positions with the given role."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        return [i for i, r in enumerate(self.roles) if r == role]


TEMPLATE_SOURCES: tuple[str, ...] = ("aligned", "aligned with corrupted", "explicit", "single-entry heuristic",
                                      "given")
"""How a relation template was obtained: ``aligned`` (the shared word prefix and suffix of the relation's prompts),
``aligned with corrupted`` (each clean prompt aligned with its subject-swapped corrupted prompt), ``explicit``
(an entry's ``subject`` field), ``single-entry heuristic`` (capitalised words of a relation's only entry) and
``given`` (a template or subjects stated in the dataset file)."""


@dataclass(frozen=True)
class RelationTemplate:
    """One sentence template of a relation: ``template`` holds ``"{}"`` where the subject goes; ``source`` is
    one or more of :data:`TEMPLATE_SOURCES` joined by ``", "``."""

    template: str
    source: str

    @property
    def display(self) -> str:
        """The template with ``{subject}`` as the placeholder."""
        return self.template.replace("{}", "{subject}", 1)


@dataclass(frozen=True)
class Relation:
    """Relation metadata: ``template`` holds ``"{}"`` where the subject goes (None if unknown). ``default``:
    whether :func:`~circuit_discovery.facts.load_builtin` includes the relation when no relations are named
    (False for built-in relations with fewer than 20 facts the default model knows). ``templates``: the
    templates the loader inferred or read for the relation's facts, with how each was obtained (empty when the
    loader recorded none; :attr:`Dataset.templates` then derives them from the facts)."""

    name: str
    description: str = ""
    template: str | None = None
    default: bool = True
    templates: tuple[RelationTemplate, ...] = ()


class Dataset(Mapping[str, list[Fact]]):
    """Facts grouped by relation, in insertion order: ``dataset[relation] -> list[Fact]``."""

    def __init__(self, facts: Mapping[str, Iterable[Fact]] | Iterable[Fact],
                 relations: Mapping[str, Relation] | None = None, *, allow_empty: bool = False) -> None:
        groups: dict[str, list[Fact]] = {}
        if isinstance(facts, Mapping):
            for name, items in facts.items():
                groups[name] = list(items)
                for f in groups[name]:
                    if f.relation != name:
                        raise DatasetError(f"fact {f.prompt!r} has relation {f.relation!r} but is filed under {name!r}")
        else:
            for f in facts:
                groups.setdefault(f.relation, []).append(f)
        groups = {k: v for k, v in groups.items() if v}
        if not groups and not allow_empty:
            raise DatasetError("the dataset is empty: give at least one relation with at least one fact")
        self._facts = groups
        rel = dict(relations or {})
        self._relations = {name: rel.get(name) or Relation(name, "", _common_template(groups[name]))
                           for name in groups}

    # Mapping protocol
    def __getitem__(self, relation: str) -> list[Fact]:
        try:
            return self._facts[relation]
        except KeyError:
            raise KeyError(f"unknown relation {relation!r}; valid: {', '.join(self._facts)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._facts)

    def __len__(self) -> int:
        return len(self._facts)

    def __repr__(self) -> str:
        return f"Dataset({len(self)} relations, {self.n_facts} facts)"

    # helpers
    @property
    def relation_names(self) -> list[str]:
        return list(self._facts)

    @property
    def relations(self) -> dict[str, Relation]:
        return dict(self._relations)

    @property
    def facts(self) -> list[Fact]:
        """All facts, relation by relation."""
        return [f for items in self._facts.values() for f in items]

    @property
    def n_facts(self) -> int:
        return sum(len(v) for v in self._facts.values())

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._facts.items()}

    @property
    def templates(self) -> dict[str, tuple[RelationTemplate, ...]]:
        """Per relation, the templates of its facts and how each was obtained (see :data:`TEMPLATE_SOURCES`).

        Templates the loader recorded come first, in its order; a fact template it did not record (rich data,
        ROME formats) is listed with source ``given``, and a fact without template as its prompt with the
        subject replaced. Only templates that some current fact uses are listed."""
        out: dict[str, tuple[RelationTemplate, ...]] = {}
        for name, items in self._facts.items():
            used = list(dict.fromkeys(fact_template(f) for f in items))
            recorded = {t.template: t for t in self._relations[name].templates}
            out[name] = tuple(recorded.get(t) or RelationTemplate(t, "given") for t in
                              [t for t in recorded if t in used] + [t for t in used if t not in recorded])
        return out

    def template_lines(self) -> list[str]:
        """Printable lines, one per relation template: ``relation: template  (source, n facts)``."""
        return template_lines(self)

    def select(self, names: str | Sequence[str]) -> Dataset:
        """Only the named relations (see :func:`select_relations`)."""
        return select_relations(self, names)

    def head(self, n: int) -> Dataset:
        """At most ``n`` facts per relation (the first ones)."""
        if n < 1:
            raise DatasetError(f"head(n) needs n >= 1, got {n}")
        return Dataset({k: v[:n] for k, v in self._facts.items()}, self._relations)

    def filter(self, keep) -> Dataset:
        """Facts for which ``keep(fact)`` is true; relations left empty are dropped."""
        return Dataset({k: [f for f in v if keep(f)] for k, v in self._facts.items()}, self._relations,
                       allow_empty=True)

    def to_dict(self) -> dict:
        """The rich JSON form (see :mod:`circuit_discovery.facts.loaders`)."""
        out = []
        for name, items in self._facts.items():
            r = self._relations[name]
            entry: dict = {"name": name, "description": r.description}
            if r.template is not None:
                entry["template"] = r.template
            if not r.default:
                entry["default"] = False
            entry["facts"] = [f.to_dict() for f in items]
            out.append(entry)
        return {"format": "circuit_discovery.facts/v1", "relations": out}

    def save(self, path) -> None:
        """Write :meth:`to_dict` atomically as JSON."""
        from circuit_discovery.io import atomic_write_json

        atomic_write_json(path, self.to_dict())


def fact_template(fact: Fact) -> str:
    """The fact's template, or its prompt with the first occurrence of its subject replaced by ``"{}"``."""
    if fact.template and "{}" in fact.template:
        return fact.template
    return fact.prompt.replace(fact.subject, "{}", 1)


def template_lines(dataset: Dataset) -> list[str]:
    """One printable line per relation template, e.g.
    ``country_language: Most people in {subject} speak  (aligned, 3 facts)``."""
    lines = []
    for name, templates in dataset.templates.items():
        counts: dict[str, int] = {}
        for f in dataset[name]:
            t = fact_template(f)
            counts[t] = counts.get(t, 0) + 1
        for rt in templates:
            n = counts.get(rt.template, 0)
            lines.append(f"{name}: {rt.display}  ({rt.source}, {n} fact{'' if n == 1 else 's'})")
    return lines


def _common_template(facts: Sequence[Fact]) -> str | None:
    templates = {f.template for f in facts}
    return templates.pop() if len(templates) == 1 else None


def select_relations(dataset: Dataset, names: str | Sequence[str]) -> Dataset:
    """Restrict ``dataset`` to ``names`` (a name or a list); unknown names raise :class:`DatasetError`."""
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    if not names:
        raise DatasetError(f"no relation names given; valid: {', '.join(dataset)}")
    unknown = [n for n in names if n not in dataset]
    if unknown:
        raise DatasetError(f"unknown relation(s) {', '.join(map(repr, unknown))}; valid: {', '.join(dataset)}")
    return Dataset({n: dataset[n] for n in names}, dataset.relations)


def with_answer(fact: Fact, answer: str) -> Fact:
    """``fact`` with ``answer`` as its main answer and the old one moved to the aliases."""
    if answer == fact.answer:
        return fact
    aliases = tuple(a for a in (fact.answer, *fact.aliases) if a != answer)
    return replace(fact, answer=answer, aliases=aliases)
