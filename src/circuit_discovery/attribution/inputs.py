"""Shared plumbing of the attribution methods: clean/corrupted inputs, cached runs, hook-to-node mapping."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuit_discovery.errors import InputError
from circuit_discovery.metrics import PromptBatch, batch_from_pairs, get_metric, make_batch
from circuit_discovery.nodes import Node

POSITIONAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
DIRECTIONS = ("denoising", "noising")


@dataclass
class PairInputs:
    """Clean and corrupted prompts of equal lengths, scored on the clean answers.

    ``clean``/``corrupted``: PromptBatch (tokens [batch, pos], same mask); ``noise``: [batch, pos, d_model] or
    None, added to ``hook_embed`` in the corrupted run (pairs with ``corruption="noise"``); ``tokens``/``roles``:
    per-prompt labels for :class:`Scores`.
    """
    clean: PromptBatch
    corrupted: PromptBatch
    noise: Tensor | None
    tokens: list[list[str]]
    roles: list[list[str]]

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def lengths(self) -> list[int]:
        return self.clean.mask.sum(1).tolist()

    @classmethod
    def from_pairs(cls, model, pairs, noise_scale: float = 3.0, seed: int = 0,
                   noise_std: float | None = None) -> PairInputs:
        """Batches of ``pairs``. Pairs with ``corruption="noise"`` get Gaussian noise on their subject embeddings
        with standard deviation ``noise_std`` (absolute) or, by default, ``noise_scale`` x the std of the subject
        tokens' embeddings of ``pairs`` (ROME; :func:`subject_embedding_std`)."""
        pairs = list(pairs)
        check_pairs(pairs)
        clean = batch_from_pairs(model, pairs)
        corrupted = batch_from_pairs(model, pairs, corrupted=True)
        noise = None
        if any(p.corruption == "noise" for p in pairs):
            if noise_std is None:
                std = subject_embedding_std(model, pairs)
            else:
                std, noise_scale = _check_noise_std(noise_std), 1.0
            gen = torch.Generator().manual_seed(seed)
            b, n = clean.tokens.shape
            noise = torch.zeros(b, n, model.cfg.d_model, dtype=model.dtype)
            for i, p in enumerate(pairs):
                if p.corruption == "noise":
                    s, e = p.subject_span
                    noise[i, s:e] = noise_scale * std * torch.randn(e - s, model.cfg.d_model, generator=gen,
                                                                    dtype=torch.float64).to(model.dtype)
            noise = noise.to(model.device)
        tokens = [[model.tokenizer.decode([t]) for t in p.clean_tokens] for p in pairs]
        return cls(clean, corrupted, noise, tokens, [list(p.roles) for p in pairs])

    @classmethod
    def from_tokens(cls, model, clean_tokens: Sequence[Sequence[int]], corrupted_tokens: Sequence[Sequence[int]],
                    answer_ids: Sequence[Sequence[int]], cf_ids: Sequence[Sequence[int]] | None = None,
                    noise: Tensor | None = None) -> PairInputs:
        """Inputs from token-id lists (BOS included); roles are unknown (``relation`` everywhere)."""
        if len(clean_tokens) != len(corrupted_tokens):
            raise InputError("clean and corrupted token lists must have the same number of prompts")
        for c, k in zip(clean_tokens, corrupted_tokens):
            if len(c) != len(k):
                raise InputError(f"clean and corrupted prompts must have equal lengths, got {len(c)} and {len(k)}")
        clean = make_batch(model, clean_tokens, answer_ids, cf_ids)
        corr = make_batch(model, corrupted_tokens, answer_ids, cf_ids)
        tokens = [[model.tokenizer.decode([t]) for t in c] for c in clean_tokens]
        return cls(clean, corr, noise, tokens, [["relation"] * len(c) for c in clean_tokens])


def check_pairs(pairs) -> None:
    """At least one pair, and clean and corrupted prompts of equal token length (positions must align)."""
    if not pairs:
        raise InputError("no fact pairs given: pass a non-empty list of FactPair")
    for p in pairs:
        if len(p.clean_tokens) != len(p.corrupted_tokens):
            raise InputError(f"pair {p.clean_prompt!r}: clean and corrupted prompts differ in length "
                             f"({len(p.clean_tokens)} vs {len(p.corrupted_tokens)}); rebuild with build_pairs")


def as_inputs(model, pairs_or_inputs, noise_scale: float = 3.0, seed: int = 0,
              noise_std: float | None = None) -> PairInputs:
    if isinstance(pairs_or_inputs, PairInputs):
        return pairs_or_inputs
    return PairInputs.from_pairs(model, pairs_or_inputs, noise_scale=noise_scale, seed=seed, noise_std=noise_std)


def _check_noise_std(noise_std) -> float:
    v = float(noise_std)
    if not (v > 0 and v < float("inf")):
        raise InputError(f"noise_std must be a positive finite number, got {noise_std!r}")
    return v


def subject_token_ids(pairs) -> list[int]:
    """Token ids of every subject token of ``pairs`` (``clean_tokens[subject_span]``), in order, repeats kept."""
    ids: list[int] = []
    for p in pairs:
        s, e = p.subject_span
        if not 0 <= s < e <= len(p.clean_tokens):
            raise InputError(f"pair {getattr(p, 'clean_prompt', p)!r}: subject span {(s, e)} outside its "
                             f"{len(p.clean_tokens)} tokens; rebuild the pair with build_pairs")
        ids.extend(int(t) for t in p.clean_tokens[s:e])
    return ids


def subject_embedding_std(model, pairs_or_ids) -> float:
    """ROME's noise unit: the standard deviation of the subject tokens' embeddings over a dataset.

    ROME (``collect_embedding_std``) embeds every subject of the traced dataset and takes the std of all the
    values together; the corruption noise is 3 x that. ``pairs_or_ids``: FactPairs (their subject tokens, as
    tokenised in the prompt, repeats kept: one entry per subject token of each pair) or a flat list of token
    ids. Embeddings are taken as ``hook_embed`` sees them (Gemma's sqrt(d_model) scale included), which is
    where the noise is added. Needs at least two values (always true for d_model >= 2).
    """
    items = list(pairs_or_ids)
    if not items:
        raise InputError("no subject tokens to take the embedding std of: pass a non-empty list of pairs")
    ids = subject_token_ids(items) if hasattr(items[0], "subject_span") else [int(t) for t in items]
    if not ids:
        raise InputError("the pairs have no subject tokens (empty subject spans)")
    with torch.no_grad():
        e = model.embed(torch.tensor([ids], dtype=torch.long))[0].double()  # [n_tokens, d_model]
    return float(e.std())


def embedding_std(model) -> float:
    """Standard deviation of the model's whole token-embedding matrix as ``hook_embed`` sees them (scale
    included). Kept for reference; ROME's noise unit is :func:`subject_embedding_std`."""
    cached = getattr(model, "_frc_embedding_std", None)
    if cached is not None:  # 168M embedding values on Gemma 3: compute once per model
        return cached
    W = model.W_E
    probe = torch.tensor([[min(5, W.shape[0] - 1)]], device=model.device)
    with torch.no_grad():
        e = model.embed(probe)[0, 0].double()
        raw = W[probe[0, 0]].double()
        scale = float(e.norm() / raw.norm()) if float(raw.norm()) > 0 else 1.0
        std = float(W.double().std()) * scale if W.numel() < 5e7 else float(_chunked_std(W)) * scale
    model._frc_embedding_std = std
    return std


def _chunked_std(W: Tensor) -> float:
    s = s2 = 0.0
    n = W.numel()
    for chunk in torch.split(W, 16384):
        c = chunk.double()
        s += float(c.sum())
        s2 += float((c * c).sum())
    mean = s / n
    return ((s2 / n - mean * mean) * n / (n - 1)) ** 0.5


def select(batch: PromptBatch, idx: Tensor) -> PromptBatch:
    """Rows ``idx`` [n] of a batch (repeats allowed)."""
    il = idx.tolist()
    return PromptBatch(batch.tokens[idx], batch.mask[idx], batch.last[idx], [batch.answer_ids[i] for i in il],
                       [batch.cf_ids[i] for i in il])


def metric_name(metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be 'denoising' or 'noising', got {direction!r}")


def noise_hook(noise: Tensor | None):
    if noise is None:
        return []
    return [("hook_embed", lambda x, name: x + noise.to(x.dtype))]


def cached_run(model, inputs: PairInputs, which: str, names: Sequence[str], metric) -> tuple[Tensor, dict]:
    """Run the clean or corrupted prompts once; returns (metric [batch], {hook: activation}) without grads."""
    cache: dict[str, Tensor] = {}

    def save(x, name):
        cache[name] = x.detach()

    b = inputs.clean if which == "clean" else inputs.corrupted
    hooks = (noise_hook(inputs.noise) if which == "corrupted" else []) + [(n, save) for n in names]
    with torch.no_grad(), model.hooks(hooks):
        h = model.final_hidden(b.tokens, b.mask)
        m = get_metric(metric)(model, h, inputs.clean)
    return m.detach(), cache


_HOOK_RE = [
    (re.compile(r"^hook_embed$"), "embed"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), "resid_pre"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_mid$"), "resid_mid"),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), "resid_post"),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), "attn_out"),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), "mlp_out"),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_z$"), "head"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$"), "neuron"),
]


def parse_hook(name: str) -> tuple[str, int]:
    """``blocks.5.hook_mlp_out`` -> (``mlp_out``, 5); ``hook_embed`` -> (``embed``, -1)."""
    for pat, comp in _HOOK_RE:
        m = pat.match(name)
        if m:
            return comp, int(m.group(1)) if m.groups() else -1
    raise InputError(f"hook {name!r} has no node component; use one of hook_embed, blocks.L.hook_resid_pre/"
                     "resid_mid/resid_post/attn_out/mlp_out, blocks.L.attn.hook_z, blocks.L.mlp.hook_post")


def hook_for(component: str, layer: int) -> str:
    n = Node(component, layer)
    if n.hook_name is None:
        raise InputError(f"component {component!r} has no model hook")
    return n.hook_name


def reduce_to_nodes(x: Tensor, component: str, layer: int, lengths: Sequence[int],
                    head_positions: bool = True) -> tuple[list[Node], Tensor]:
    """Per-element scores of one hook [batch, pos, ...] -> (nodes, values [batch, n_nodes]).

    d_model hooks sum over features per position; ``head`` gives (position, head) nodes (or (layer, head) summed
    over positions when ``head_positions`` is false); ``neuron`` gives (position, neuron) nodes. Positions past a
    prompt's length are NaN.
    """
    b, n_pos = x.shape[:2]
    pad = torch.arange(n_pos, device=x.device)[None, :] >= torch.tensor(lengths, device=x.device)[:, None]
    x = x.double()
    if component == "head":
        per = x.sum(-1)  # [b, pos, head]
        if not head_positions:
            per = per.masked_fill(pad[:, :, None], 0.0).sum(1)  # [b, head]
            nodes = [Node("head", layer, None, h) for h in range(per.shape[1])]
            return nodes, per
        per = per.masked_fill(pad[:, :, None], float("nan"))
        nodes = [Node("head", layer, p, h) for p in range(n_pos) for h in range(per.shape[2])]
        return nodes, per.reshape(b, -1)
    if component == "neuron":
        per = x.masked_fill(pad[:, :, None], float("nan"))
        nodes = [Node("neuron", layer, p, i) for p in range(n_pos) for i in range(per.shape[2])]
        return nodes, per.reshape(b, -1)
    per = x.sum(-1).masked_fill(pad, float("nan"))
    return [Node(component, layer, p) for p in range(n_pos)], per
