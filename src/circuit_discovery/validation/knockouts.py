"""Model-side measurements for the built-in hypotheses that need an intervention of their own.

``attention_knockout``: Geva et al. (2023) block the attention edges from the subject tokens to the last token in a
window of layers and measure how much the prediction suffers. Here: the metric drop, clean metric minus the metric
with the last token unable to attend to any subject token in the chosen layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from circuit_discovery.metrics import batch_from_pairs, get_metric


def attention_knockout_drop(model, pairs: Sequence, layers: Sequence[int], metric="logit_diff") -> np.ndarray:
    """Per-prompt metric drop [n_prompts] when the last prompt token cannot attend to the subject tokens in
    ``layers`` (every head). Pairs are run in one batch; positions come from each pair's ``subject_span``."""
    pairs = list(pairs)
    batch = batch_from_pairs(model, pairs)
    fn = get_metric(metric)
    b, n = batch.tokens.shape
    block = torch.zeros(b, n, n, dtype=torch.bool)
    for i, p in enumerate(pairs):
        s, e = p.subject_span
        block[i, int(batch.last[i]), s:e] = True
    with torch.no_grad():
        clean = fn(model, model.final_hidden(batch.tokens, batch.mask), batch)
        with model.block_attention(layers, block):
            blocked = fn(model, model.final_hidden(batch.tokens, batch.mask), batch)
    return (clean - blocked).float().cpu().numpy()


def attention_knockout_halves(model, pairs: Sequence, metric="logit_diff") -> dict[str, np.ndarray]:
    """The context of the ``late_attention_extraction`` hypothesis: drops with the upper and the lower half of the
    layers blocked (``attn_block_drop_upper``, ``attn_block_drop_lower``), each [n_prompts]."""
    L = model.cfg.n_layers
    lower, upper = list(range(L // 2)), list(range(L // 2, L))
    return {"attn_block_drop_upper": attention_knockout_drop(model, pairs, upper, metric),
            "attn_block_drop_lower": attention_knockout_drop(model, pairs, lower, metric)}
