"""Known-fact filter: keep the facts whose first answer token the model ranks within the top ``k``.

Uses the ``HookedModel`` contract (docs/ARCHITECTURE.md): ``model.to_tokens(prompts)`` (right padded,
BOS prepended), ``model.last_logits(tokens, attention_mask=...)`` ``-> [batch, d_vocab]`` and
``model.tokenizer``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from circuit_discovery.facts.pairs import align_answer, answer_tokens
from circuit_discovery.facts.types import Dataset, DatasetError, Fact, with_answer


def answer_ranks(logits: torch.Tensor, answer_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """1-based rank of each row's answer token among all tokens.

    logits: ``[batch, d_vocab]``; answer_ids: ``[batch]`` -> LongTensor ``[batch]``. Rank is
    ``1 + #(tokens with a strictly larger logit)``, so ties favour the answer.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, d_vocab], got shape {tuple(logits.shape)}")
    ids = torch.as_tensor(answer_ids, dtype=torch.long, device=logits.device).reshape(-1)
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(f"{ids.shape[0]} answer ids for {logits.shape[0]} logit rows")
    if ids.numel() and (ids.min() < 0 or ids.max() >= logits.shape[1]):
        raise ValueError(f"answer ids must lie in [0, {logits.shape[1]}), got {ids.tolist()}")
    target = logits.gather(1, ids[:, None])
    return (logits > target).sum(dim=1) + 1


@dataclass
class RelationAccuracy:
    n: int = 0
    n_known: int = 0

    @property
    def accuracy(self) -> float:
        return self.n_known / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {"n": self.n, "n_known": self.n_known, "accuracy": self.accuracy}


@dataclass
class FactScore:
    relation: str
    subject: str
    prompt: str
    answer: str          # the answer (or alias) with the best rank
    rank: int            # its first-token rank (1 = top)
    known: bool


@dataclass
class KnownReport:
    """Per-relation accuracy of the known-fact filter plus per-fact ranks."""

    k: int
    per_relation: dict[str, RelationAccuracy] = field(default_factory=dict)
    scores: list[FactScore] = field(default_factory=list)

    @property
    def n(self) -> int:
        return sum(r.n for r in self.per_relation.values())

    @property
    def n_known(self) -> int:
        return sum(r.n_known for r in self.per_relation.values())

    @property
    def accuracy(self) -> float:
        return self.n_known / self.n if self.n else float("nan")

    def to_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "n_known": self.n_known, "accuracy": self.accuracy,
                "per_relation": {k: v.to_dict() for k, v in self.per_relation.items()},
                "facts": [asdict(s) for s in self.scores]}

    @classmethod
    def from_dict(cls, d: dict) -> KnownReport:
        """Inverse of :meth:`to_dict` (the derived ``n``, ``n_known`` and ``accuracy`` are recomputed)."""
        return cls(k=int(d["k"]),
                   per_relation={r: RelationAccuracy(int(a["n"]), int(a["n_known"]))
                                 for r, a in d.get("per_relation", {}).items()},
                   scores=[FactScore(**s) for s in d.get("facts", [])])

    def kept(self, facts: Dataset | Iterable[Fact]) -> Dataset | list[Fact]:
        """The known facts of ``facts`` (the facts this report was made from), each with its best-ranked answer
        (the old answer moves to the aliases), in their order: what :func:`filter_known` returns, rebuilt from
        the report (the i-th score belongs to the i-th fact when they match one to one; else a fact is matched by
        relation, subject and prompt, and facts the report lacks are dropped)."""
        flat = facts.facts if isinstance(facts, Dataset) else list(facts)
        keys = [(f.relation, f.subject, f.prompt) for f in flat]
        scores: Sequence[FactScore | None]
        if keys == [(s.relation, s.subject, s.prompt) for s in self.scores]:
            scores = self.scores
        else:
            best = {(s.relation, s.subject, s.prompt): s for s in self.scores}
            scores = [best.get(key) for key in keys]
        kept = [with_answer(f, s.answer) for f, s in zip(flat, scores) if s is not None and s.known]
        if isinstance(facts, Dataset):
            return Dataset(kept, facts.relations, allow_empty=True)
        return kept


def _attention_mask(model, tokens: torch.Tensor) -> torch.Tensor:
    pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    if pad is None:
        return torch.ones_like(tokens)
    mask = (tokens != pad).long()
    return mask.cumprod(dim=1)  # right padding: everything after the first pad is padding


def _teacher_forced_worst_rank(model, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> list[int]:
    """The worst rank of any answer token when the answer is fed after its prompt (teacher forcing)."""
    tokens, mask = model.tokenize(prompts)
    lengths = mask.sum(1).tolist()
    n = max(l + len(a) - 1 for l, a in zip(lengths, answers))
    pad = model.cfg.pad_token_id or 0
    ext = torch.full((len(prompts), n), pad, dtype=torch.long, device=tokens.device)
    ext_mask = torch.zeros_like(ext)
    for r, (l, a) in enumerate(zip(lengths, answers)):
        row = tokens[r, :l].tolist() + list(a[:-1])
        ext[r, : len(row)] = torch.tensor(row)
        ext_mask[r, : len(row)] = 1
    hidden = model.final_hidden(ext, ext_mask)
    rows = [(r, p) for r, (l, a) in enumerate(zip(lengths, answers)) for p in range(l - 1, l - 1 + len(a))]
    r_idx = torch.tensor([r for r, _ in rows], device=hidden.device)
    p_idx = torch.tensor([p for _, p in rows], device=hidden.device)
    # one full-vocabulary unembedding for every answer position of the batch (it is bound by reading the
    # unembedding matrix, so one call per fact would cost as much as one per batch)
    ranks = answer_ranks(model.unembed(hidden[r_idx, p_idx]).float(), [t for a in answers for t in a])
    out, i = [], 0
    for a in answers:
        out.append(int(ranks[i: i + len(a)].max()))
        i += len(a)
    return out


def filter_known(model, facts: Dataset | Iterable[Fact], k: int = 1, batch_size: int = 32,
                 progress: bool = True, use_aliases: bool = True,
                 all_tokens: bool = True) -> tuple[Dataset | list[Fact], KnownReport]:
    """Keep facts whose first answer token has rank ``<= k`` at the last prompt position.

    With ``all_tokens`` (default) every token of a multi-token answer must also rank ``<= k`` when the answer
    is teacher-forced (needs a model with ``final_hidden``, i.e. a HookedModel): otherwise the shared "1" of
    years split into digits would make every date "known". ``all_tokens=False`` is ROME's first-token rule.

    With ``use_aliases`` a fact also counts as known through an alias; the kept fact then has the best
    ranked alias as its answer (the old answer moves to the aliases). A whitespace-only first answer
    token is skipped as in :func:`~circuit_discovery.facts.pairs.align_answer`. Returns the kept facts
    (a :class:`Dataset` when given one, else a list) and a :class:`KnownReport`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    is_ds = isinstance(facts, Dataset)
    flat = facts.facts if isinstance(facts, Dataset) else list(facts)
    if not flat:
        raise DatasetError("no facts to filter; give a non-empty dataset")
    tok = model.tokenizer

    items: list[tuple[str, list[tuple[str, list[int]]]]] = []  # (prompt, [(answer_text, answer_token_ids)])
    for f in flat:
        cands = []
        prompt: str | None = None
        for a in (f.answers if use_aliases else (f.answer,)):
            p, aligned = align_answer(tok, f.prompt, a)
            if prompt is None:
                prompt = p
            elif p != prompt:  # alias tokenizes differently around the prompt end: score it on the main prompt
                aligned = a
            cands.append((a, answer_tokens(tok, aligned)))
        assert prompt is not None  # f.answers always holds f.answer
        items.append((prompt, cands))

    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths -> less padding
    best: dict[int, tuple[str, int]] = {}
    best_ids: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"known facts (top-{k})", unit="batch")
    with torch.no_grad():
        for idx in iterator:
            prompts = [items[i][0] for i in idx]
            if hasattr(model, "tokenize"):  # HookedModel: tokens and attention mask together
                tokens, mask = model.tokenize(prompts)
            else:
                tokens = model.to_tokens(prompts)
                mask = _attention_mask(model, tokens)
            logits = model.last_logits(tokens, attention_mask=mask).float().cpu()
            for row, i in enumerate(idx):
                cands = items[i][1]
                ranks = answer_ranks(logits[row:row + 1].expand(len(cands), -1), [c[1][0] for c in cands]).tolist()
                j = min(range(len(cands)), key=lambda c: ranks[c])
                best[i] = (cands[j][0], int(ranks[j]))
                best_ids[i] = cands[j][1]
        # multi-token answers (years split into digits, two-word names): every token must rank <= k when the
        # answer is teacher-forced, else the first token alone (e.g. "1" of "1789") would decide
        multi = ([i for i in best if best[i][1] <= k and len(best_ids[i]) > 1]
                 if all_tokens and hasattr(model, "final_hidden") else [])
        for start in range(0, len(multi), batch_size):
            idx = multi[start:start + batch_size]
            worst = _teacher_forced_worst_rank(model, [items[i][0] for i in idx], [best_ids[i] for i in idx])
            for i, r in zip(idx, worst):
                best[i] = (best[i][0], max(best[i][1], r))

    report = KnownReport(k=k)
    for i, f in enumerate(flat):
        answer, rank = best[i]
        known = rank <= k
        acc = report.per_relation.setdefault(f.relation, RelationAccuracy())
        acc.n += 1
        acc.n_known += known
        report.scores.append(FactScore(f.relation, f.subject, f.prompt, answer, rank, known))
    return report.kept(facts if is_ds else flat), report
