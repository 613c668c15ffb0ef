"""Scores (role alignment, tables, save/load, heatmaps) and causal tracing on a tiny model."""
import math

import numpy as np
import pytest
import torch

from circuit_discovery import load_model
from circuit_discovery.attribution import (Node, Scores, causal_tracing, default_window, token_classes)
from circuit_discovery.errors import InputError
from circuit_discovery.facts import Fact, build_pairs


def _scores():
    nodes = [Node("mlp_out", l, p) for l in range(2) for p in range(4)] + [Node("head", 0, None, 1)]
    vals = torch.arange(2 * len(nodes), dtype=torch.float64).reshape(2, -1)
    vals[1, 3] = float("nan")  # prompt 1 is one token shorter
    vals[1, 7] = float("nan")
    return Scores(nodes, vals, tokens=[["<bos>", "A", "B", "C"], ["<bos>", "X", "Y"]],
                  roles=[["bos", "subject_first", "subject_last", "last"], ["bos", "subject_last", "last"]],
                  clean_metric=torch.tensor([2.0, 4.0]), corrupted_metric=torch.tensor([1.0, 0.0]),
                  method="test", metric="logit_diff")


def test_by_role_aligns_prompts():
    s = _scores()
    r = s.by_role()
    assert r.position_names == ["bos", "subject_first", "subject_last", "last"]
    v = s.values
    # prompt 0: identity mapping; prompt 1: position 1 is subject_last, position 2 is last, no subject_first
    assert r[Node("mlp_out", 0, 2)].tolist() == [v[0, 2].item(), v[1, 1].item()]
    assert r[Node("mlp_out", 1, 3)].tolist() == [v[0, 7].item(), v[1, 6].item()]
    assert math.isnan(r[Node("mlp_out", 0, 1)][1].item())
    assert r[Node("head", 0, None, 1)].tolist() == v[:, 8].tolist()
    assert r.mean()[r.nodes.index(Node("mlp_out", 0, 1))].item() == v[0, 1].item()  # NaN ignored


def test_table_save_load_and_normalize(tmp_path):
    s = _scores()
    df = s.to_dataframe()
    assert len(df) == int((~torch.isnan(s.values)).sum())
    row = df[(df.prompt == 1) & (df.node == "mlp_out/L0/P1")].iloc[0]
    assert row.token == "X" and row.role == "subject_last" and row.value == s.values[1, 1].item()
    agg = s.to_dataframe(aggregate=True)
    assert agg.loc[agg.node == "mlp_out/L0/P3", "n"].item() == 1
    s.save(tmp_path / "s")
    t = Scores.load(tmp_path / "s")
    assert t.nodes == s.nodes and torch.equal(torch.nan_to_num(t.values), torch.nan_to_num(s.values))
    assert t.tokens == s.tokens and t.roles == s.roles and torch.equal(t.clean_metric, s.clean_metric)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["scores.json", "scores.safetensors"]
    n = s.normalized()
    assert n.values[1, 0].item() == s.values[1, 0].item() / 4.0
    with pytest.raises(InputError):
        Scores.load(tmp_path)
    with pytest.raises(InputError):
        Scores([Node("mlp_out", 0, 0)], torch.zeros(2, 3))


def test_heatmaps_are_drawn_by_the_report_figures(tmp_path, monkeypatch):
    """Scores.heatmap hands the layer x position (or layer x head) table and its labels to report.figures."""
    from circuit_discovery.report import figures as F

    calls = []

    def spy(name):
        real = getattr(F, name)

        def fn(data, *args, **kw):
            calls.append((name, np.asarray(data), args[0] if name == "patching_heatmap" else None))
            return real(data, *args, **kw)
        monkeypatch.setattr(F, name, fn)

    spy("patching_heatmap")
    spy("head_heatmap")
    s = _scores()
    assert s.heatmap("mlp_out", prompt=0, path=tmp_path / "a.png").stat().st_size > 1000
    name, data, labels = calls[-1]
    assert name == "patching_heatmap" and data.shape == (2, 4)
    assert labels == ["'<bos>'", "'A'", "'B'", "'C'"]
    s.by_role().heatmap("mlp_out", path=tmp_path / "b.png")
    assert calls[-1][2][-1] == "last"
    with pytest.raises(InputError, match="by_role"):
        s.heatmap("mlp_out", path=tmp_path / "c.png")
    s.heatmap("head", prompt=1, path=tmp_path / "d.png")
    assert calls[-1][0] == "head_heatmap" and calls[-1][1].shape == (1, 2)
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert s.per_prompt_array("head").shape == (2, 1, 2)


def test_token_classes_and_window():
    assert token_classes(9, (2, 5)) == {"first_subject": [2], "middle_subject": [3], "last_subject": [4],
                                        "first_subsequent": [5], "further": [6, 7], "last": [8]}
    assert token_classes(4, (1, 2))["first_subject"] == [1] == token_classes(4, (1, 2))["last_subject"]
    assert [default_window(n) for n in (48, 28, 18, 4, 100)] == [10, 6, 4, 1, 10]
    with pytest.raises(InputError):
        token_classes(4, (2, 4))


def test_causal_tracing_on_tiny_model(tmp_path):
    m = load_model("tiny-gemma3", device="cpu", dtype="float64")
    facts = [Fact("capital", s, f"The capital of {s} is", a, template="The capital of {} is")
             for s, a in (("France", " Paris"), ("Japan", " Tokyo"))]
    pairs = build_pairs(facts, m.tokenizer)
    t = causal_tracing(m, pairs, n_samples=2, seed=1)
    again = causal_tracing(m, pairs, n_samples=2, seed=1)
    torch.testing.assert_close(t.scores.values, again.scores.values)
    # oracle: the clean answer probability by a plain forward; restoring the final state at the last token
    # restores the clean run, so its indirect effect is the total effect
    for i, p in enumerate(pairs):
        logits = m(torch.tensor([p.clean_tokens]))[0, -1]
        assert t.p_clean[i].item() == pytest.approx(torch.softmax(logits, -1)[p.answer_tokens[0]].item(), rel=1e-5)  # norms run in fp32
    L, last = m.cfg.n_layers - 1, len(pairs[0].clean_tokens) - 1
    torch.testing.assert_close(t.scores[Node("resid_post", L, last)], t.total_effect, atol=1e-9, rtol=0)
    # restoring a state after the subject at a position before it changes nothing
    assert t.scores[Node("resid_post", 0, 1)].abs().max().item() < 1e-12
    summ = t.summary()
    assert set(summ) >= {"states", "mlp", "attn", "total_effect"}
    assert np.asarray(summ["mlp"]["table"]).shape == (6, m.cfg.n_layers)
    assert t.figure(tmp_path / "ct.png").stat().st_size > 1000
    # the figure is the report's causal-tracing figure of the by_class tables, byte for byte
    from circuit_discovery.report.figures import causal_tracing_figure

    causal_tracing_figure(*(t.by_class(k) for k in ("states", "mlp", "attn")), summ["classes"], tmp_path / "r.png",
                          title="Causal tracing (ROME), mean over 2 facts")
    assert (tmp_path / "ct.png").read_bytes() == (tmp_path / "r.png").read_bytes()
