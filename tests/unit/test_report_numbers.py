"""report.md shows every number once or, where it shows a number twice, with one value; it defines every table
column; its headline gives the facts used, top nodes with their tokens, timings equal to config.json's, and a
plain warning on every circuit that is not a finding.

Oracles: report.md is parsed here as text (an independent markdown-table reader); the figures' printed numbers are
read back from the PNG files (``figures.shown_values``); config.json, metrics.json, circuits.json and
hypotheses.csv are read with ``json``/``csv``. Numeric agreement is checked to the precision shown: two displays of
one number may differ by at most half a unit of the coarser one's last digit.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from circuit_discovery.pipeline import RunConfig, run_pipeline
from circuit_discovery.pipeline.report_stage import (
    GLOSSARY,
    Finding,
    circuit_finding,
    dictionary_quality,
    role_tokens,
    write_outputs,
)
from circuit_discovery.report.figures import shown_values

BASE = dict(model="tiny-gemma3", known_k=10**6, quick=True, relations=["capital_city", "city_country"], quick_facts=4,
            quick_held_out=3, progress=False)
#: the default run's copy, checked when present (issue 18: regenerate it with `frc report --out DIR`)
DEFAULT_RUN = Path(os.environ.get("CIRCUIT_DISCOVERY_DEFAULT_RUN", "/tmp/report/run"))
GLOSSARY_HEADER = ["term", "meaning", "unit", "unit of observation"]


# ------------------------------------------------------------------------------------------ markdown reader

@dataclass
class Table:
    section: str          # the "## " heading above the table
    header: list[str]
    rows: list[list[str]]


def _cells(line: str) -> list[str]:
    body = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def parse_tables(md: str) -> list[Table]:
    tables: list[Table] = []
    section = ""
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|( *-+:? *\|)+$", lines[i + 1].strip()):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append(Table(section, header, rows))
            continue
        i += 1
    return tables


_NUM = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")


def numbers(cell: str) -> list[tuple[float, float]]:
    """``(value, half a unit of the last digit shown)`` of every number in ``cell``."""
    out = []
    for m in _NUM.finditer(cell):
        s = m.group().replace(",", "")
        if "e" in s:
            mant = s.split("e")[0]
            dec = len(mant.split(".")[1]) if "." in mant else 0
            tol = 0.5 * 10.0 ** (-dec) * 10.0 ** int(s.split("e")[1])
        else:
            dec = len(s.split(".")[1]) if "." in s else 0
            tol = 0.5 * 10.0 ** (-dec)
        out.append((float(s), tol))
    return out


def _agree(a: str, b: str) -> bool:
    na, nb = numbers(a), numbers(b)
    if len(na) != len(nb):
        return False
    if not na:
        return a.strip("* ") == b.strip("* ")
    return all(abs(x - y) <= max(tx, ty) + 1e-9 for (x, tx), (y, ty) in zip(na, nb))


def _within(cell: str, value: float | None) -> bool:
    """``cell``'s first number is ``value`` to the precision shown ("—" for None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell.strip() in ("—", "degenerate")
    ns = numbers(cell)
    return bool(ns) and abs(ns[0][0] - value) <= ns[0][1] + 1e-9


def _table_values(tables: list[Table]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """``{(circuit, term): [(cell, where)]}`` over every per-circuit table: rows of tables whose first column is
    ``circuit`` (the circuit named in that cell) and the ``quantity | value`` tables of each circuit's section."""
    seen: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for t in tables:
        if t.header and t.header[0] == "circuit":
            for row in t.rows:
                for h, cell in zip(t.header[1:], row[1:]):
                    seen.setdefault((row[0], h), []).append((cell, f"{t.section} table"))
        elif t.header == ["quantity", "value"]:
            for term, cell in t.rows:
                seen.setdefault((t.section, term), []).append((cell, f"{t.section} quantities"))
    return seen


def inconsistencies(run: Path) -> list[str]:
    """Every number report.md shows twice with two values, and every figure/table or table/file pair that
    disagrees; empty when every number has one value."""
    md = (run / "report.md").read_text("utf-8")
    tables = parse_tables(md)
    bad = []
    for (circuit, term), shown in _table_values(tables).items():
        for cell, where in shown[1:]:
            if not _agree(shown[0][0], cell):
                bad.append(f"{circuit} / {term}: {shown[0][0]!r} ({shown[0][1]}) vs {cell!r} ({where})")
    # circuit_overlap.png against the overlap table (and the mean printed above it)
    overlap = [t for t in tables if t.header[:3] == ["circuit", "most-overlapping circuit", "Jaccard"]]
    png = run / "figures" / "circuit_overlap.png"
    if overlap or png.exists():
        fig = shown_values(png)
        if fig is None or not overlap:
            bad.append("circuit_overlap.png and the overlap table do not come together")
        else:
            idx = {n: i for i, n in enumerate(fig["rows"])}
            cells = [[float(x) for x in row] for row in fig["cells"]]
            for row in overlap[0].rows:
                i, j = idx[row[0]], idx[row[1]]
                others = [cells[i][k] for k in range(len(cells)) if k != i]
                if not _agree(fig["cells"][i][j], row[2]) or cells[i][j] < max(others):
                    bad.append(f"Jaccard {row[0]} / {row[1]}: figure {fig['cells'][i][j]} (row max "
                               f"{max(others):.2f}) vs table {row[2]}")
                if abs(sum(others) / len(others) - numbers(row[3])[0][0]) > 0.0101:
                    bad.append(f"mean Jaccard of {row[0]}: figure {sum(others) / len(others):.3f} vs table {row[3]}")
            m = re.search(r"Mean Jaccard over the (\d+) pairs of component circuits: (-?\d+(?:\.\d+)?)", md)
            upper = [cells[a][b] for a in range(len(cells)) for b in range(a + 1, len(cells))]
            if m and (int(m.group(1)) != len(upper) or abs(sum(upper) / len(upper) - float(m.group(2))) > 0.0101):
                bad.append(f"mean Jaccard: text {m.group(2)} vs figure {sum(upper) / len(upper):.3f}")
    # timings against config.json
    cfg_t = json.loads((run / "config.json").read_text())["timings"]
    timing = [t for t in tables if t.header == ["stage", "time"]]
    shown_t = {r[0]: r[1] for r in (timing[0].rows if timing else [])}
    for stage, secs in cfg_t.items():
        if stage in ("report", "total", "this_command"):
            continue
        if stage not in shown_t or not _within(shown_t[stage], secs):
            bad.append(f"timing {stage}: config.json {secs} s vs report.md {shown_t.get(stage)!r}")
    for stage in shown_t:
        if not stage.startswith("**") and stage not in cfg_t:
            bad.append(f"timing {stage} is in report.md but not in config.json")
    # the hypotheses table against hypotheses.csv
    with open(run / "hypotheses.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    hyp = [t for t in tables if t.header and t.header[0] == "hypothesis_id"]
    if csv_rows and not hyp:
        bad.append("hypotheses.csv has rows but report.md no hypotheses table")
    for t in hyp:
        if len(t.rows) != len(csv_rows):
            bad.append(f"hypotheses: {len(t.rows)} rows in report.md, {len(csv_rows)} in hypotheses.csv")
        for row, ref in zip(t.rows, csv_rows):
            shown = dict(zip(t.header, row))
            for k in ("hypothesis_id", "relation", "statistic", "verdict"):
                if shown.get(k) != ref[k]:
                    bad.append(f"hypotheses {k}: {shown.get(k)!r} vs csv {ref[k]!r}")
            for k in ("effect", "ci_low", "ci_high", "p_value", "p_adjusted", "n"):
                v = float(ref[k]) if ref[k] not in ("", "nan") else None
                cell = shown.get(k, "—")
                ok = _within(cell, v) if v is None or not numbers(cell) else \
                    abs(numbers(cell)[0][0] - v) <= max(numbers(cell)[0][1], 5e-3 * abs(v)) + 1e-12
                if not ok:
                    bad.append(f"hypotheses {ref['hypothesis_id']}/{ref['relation']} {k}: {cell!r} vs csv {ref[k]}")
    # the headline tables against metrics.json (the one source of the circuits' numbers)
    metrics = json.loads((run / "metrics.json").read_text())
    for t in tables:
        if t.header and t.header[0] == "circuit" and "held-out f [95% CI]" in t.header:
            for row in t.rows:
                shown = dict(zip(t.header, row))
                name = row[0]
                m = (metrics.get("feature_circuits", {}).get(name.split("/")[0]) if name.endswith("/features")
                     else metrics["relations"].get(name))
                if m is None:
                    bad.append(f"{name} is in report.md but not in metrics.json")
                    continue
                checks = [("held-out f [95% CI]", None if m.get("degenerate") else m["held_out_faithfulness"]),
                          ("matched random p (draws)", m.get("random_baseline_p"))]
                for col, v in checks:
                    if not _within(shown[col], v):
                        bad.append(f"{name} {col}: report.md {shown[col]!r} vs metrics.json {v}")
    return bad


def undefined_terms(md: str) -> list[str]:
    """Column headers (and rows of per-circuit quantity tables) that the report's glossary does not define."""
    tables = parse_tables(md)
    gloss = [t for t in tables if t.header == GLOSSARY_HEADER]
    terms = {r[0] for t in gloss for r in t.rows}
    missing = []
    for t in tables:
        if t.header == GLOSSARY_HEADER:
            continue
        used = list(t.header) + ([r[0] for r in t.rows] if t.header == ["quantity", "value"] else [])
        missing += [f"{t.section}: {h}" for h in used if h not in terms]
    return missing if gloss else ["no glossary table"]


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("numbers") / "run"
    return run_pipeline(RunConfig(out=str(out), **BASE)).out_dir


def _stages(run: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json")}


def _rewrite(run: Path, dest: Path, edit=None) -> Path:
    """A copy of ``run`` whose outputs are rewritten by ``write_outputs`` from its stages, after ``edit(stages)``."""
    shutil.copytree(run, dest)
    st = _stages(dest)
    if edit is not None:
        edit(st)
    timings: dict = {}
    write_outputs(dest, RunConfig(out=str(dest), **BASE), timings, st["known"], st["attribution"],
                  st["causal_tracing"], st["circuits"], st["validation"], st["hypotheses"], st.get("dictionaries"),
                  st.get("feature_circuits"))
    cfg = json.loads((dest / "config.json").read_text())
    cfg["timings"] = timings  # what Run.write_config stores after the report stage
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _relations_table(md: str) -> Table:
    return next(t for t in parse_tables(md) if t.section == "Relations")


# ------------------------------------------------------------------------------------------ tests


def test_every_number_shown_twice_has_one_value(run):
    assert inconsistencies(run) == []
    md = (run / "report.md").read_text("utf-8")
    shown = _table_values(parse_tables(md))
    twice = [k for k, v in shown.items() if len(v) >= 2]
    assert len(twice) >= 10  # the headline table and the sections repeat numbers: the check has work to do


def test_the_check_fails_when_a_figure_and_its_table_disagree(run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    md = (out / "report.md").read_text("utf-8")
    row = next(t for t in parse_tables(md) if t.header[:3] == ["circuit", "most-overlapping circuit", "Jaccard"])
    cell = row.rows[0][2]
    wrong = f"{float(cell) + 0.03:.2f}"  # 0.46 vs 0.43: the issue's disagreement
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row.rows[0][0]} | {row.rows[0][1]} | {cell} |"))
    (out / "report.md").write_text(md.replace(line, line.replace(f"| {cell} |", f"| {wrong} |", 1)), "utf-8")
    assert any(b.startswith("Jaccard") for b in inconsistencies(out))


def test_the_check_fails_when_two_tables_disagree(run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    md = (out / "report.md").read_text("utf-8")
    rel = _relations_table(md).rows[0]
    share = rel[4]  # nodes (% of non-inert), also in the relation's section
    n = int(share.split()[0])
    sec = md.index(f"## {rel[0]}\n")
    head, tail = md[:sec], md[sec:]
    tail = tail.replace(f"| nodes (% of non-inert) | {share} |", f"| nodes (% of non-inert) | {n + 1} "
                        f"{share.split(' ', 1)[1]} |", 1)
    (out / "report.md").write_text(head + tail, "utf-8")
    bad = inconsistencies(out)
    assert any("nodes (% of non-inert)" in b for b in bad), bad


def test_the_check_fails_when_timings_differ_from_config_json(run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["timings"]["circuits"] = cfg["timings"]["circuits"] + 5.0
    (out / "config.json").write_text(json.dumps(cfg))
    assert any(b.startswith("timing circuits") for b in inconsistencies(out))


@pytest.mark.skipif(not (DEFAULT_RUN / "report.md").is_file(), reason="no copy of the default run")
def test_default_run_numbers_have_one_value():
    assert inconsistencies(DEFAULT_RUN) == []
    assert undefined_terms((DEFAULT_RUN / "report.md").read_text("utf-8")) == []


def test_glossary_defines_every_column(run):
    md = (run / "report.md").read_text("utf-8")
    assert undefined_terms(md) == []
    gloss = next(t for t in parse_tables(md) if t.header == GLOSSARY_HEADER)
    assert all(r[1] not in ("", "—") and r[2] != "" and r[3] not in ("", "—") for r in gloss.rows)
    terms = {r[0]: r for r in gloss.rows}
    assert "1 = whole model" in terms["held-out f [95% CI]"][2] and "prompt" in terms["held-out f [95% CI]"][3]
    for t in ("f", "held-out CPR", "held-out CMD", "attribution score", "matched random p (draws)", "Jaccard",
              "replacement score", "completeness score", "error share of influence", "nodes (% of non-inert)",
              "logit difference m(N) / m(empty) (held out)"):
        assert t in terms, t
    assert "f < 0" in terms["f"][1] and "counterfactual" in terms["f"][1]  # the sign convention
    # the check fails on a column the glossary lacks
    extra = md.replace("| circuit | facts used", "| circuit | mystery column | facts used", 1)
    assert any("mystery column" in u for u in undefined_terms(extra))
    assert len({g["term"] for g in GLOSSARY}) == len(GLOSSARY)


def test_headline_gives_facts_used_not_the_relations_fact_count(run):
    md = (run / "report.md").read_text("utf-8")
    rel = _relations_table(md)
    assert rel.header[:2] == ["circuit", "facts used (discovery / held out)"]
    assert "facts" not in rel.header and "known" not in rel.header
    metrics = json.loads((run / "metrics.json").read_text())
    for row in rel.rows:
        m = metrics["relations"][row[0]]
        assert row[1] == f"{m['n_discovery']} / {m['n_held_out']}"
    feat = next(t for t in parse_tables(md) if t.section.startswith("Feature circuits") and t.header[0] == "circuit")
    for row in feat.rows:
        m = metrics["feature_circuits"][row[0].split("/")[0]]
        assert row[1] == f"{m['n_discovery']} / {m['n_held_out']}"
        assert m["n_discovery"] <= BASE["quick_facts"]


def test_top_nodes_name_their_tokens(run):
    md = (run / "report.md").read_text("utf-8")
    circuits = {c["name"]: c for c in json.loads((run / "circuits.json").read_text())["circuits"]}
    rel = _relations_table(md)
    col = rel.header.index("top nodes")
    n_tokens = 0
    for row in rel.rows:
        prompt = "".join(circuits[row[0]]["prompt_tokens"])
        for entry in row[col].split("), "):
            assert "(" in entry  # every node names its role
            toks = re.findall(r"'((?:[^'\\]|\\.)*)'", entry)
            if "absent from the representative prompt" not in entry:
                assert toks, entry
            for t in toks:
                assert t in prompt, (t, prompt)
            n_tokens += len(toks)
        assert not re.search(r"(^|, )Emb(,|$)", row[col])  # no bare "Emb"
    assert n_tokens >= len(rel.rows)


def test_role_tokens_on_a_gemma_prompt():
    toks = ["<bos>", "The", " Louvre", " is", " located", " in", " the", " city", " of"]
    got = role_tokens(toks, "The Louvre is located in the city of", "The Louvre")
    assert got == {"bos": [(0, "<bos>")], "subject_first": [(1, "The")], "subject_last": [(2, " Louvre")],
                   "relation_first": [(3, " is")], "relation": [(4, " located"), (5, " in"), (6, " the"), (7, " city")],
                   "last": [(8, " of")]}
    assert role_tokens(toks, "The Louvre is located in the city of", None) == {"last": [(8, " of")],
                                                                               "bos": [(0, "<bos>")]}


def test_timings_equal_config_json_even_after_a_report_only_rewrite(run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(run, out)
    stage_seconds = {k: v["_seconds"] for k, v in _stages(out).items() if "_seconds" in v}
    run_pipeline(RunConfig(out=str(out), resume=True, **BASE), only=["report"])
    cfg_t = json.loads((out / "config.json").read_text())["timings"]
    for k, v in stage_seconds.items():
        assert cfg_t[k] == v  # the stages' own times survive `frc report`
    assert [b for b in inconsistencies(out) if b.startswith("timing")] == []
    md = (out / "report.md").read_text("utf-8")
    timing = next(t for t in parse_tables(md) if t.header == ["stage", "time"])
    total = numbers(timing.rows[-1][1])[0][0]
    assert abs(total - sum(stage_seconds.values())) <= 0.05 * len(stage_seconds) + 0.05


def _warned(md: str) -> set[str]:
    return set(re.findall(r"\*\*Warning — (\S+): not a finding\.\*\*", md))


def test_every_circuit_that_is_not_a_finding_carries_a_warning(run):
    md = (run / "report.md").read_text("utf-8")
    metrics = json.loads((run / "metrics.json").read_text())
    names = {c["name"] for c in json.loads((run / "circuits.json").read_text())["circuits"]}
    not_found = {n for n in names if not circuit_finding(
        metrics["feature_circuits"][n.split("/")[0]] if n.endswith("/features") else metrics["relations"][n],
        "feature" if n.endswith("/features") else "component", metrics.get("dictionaries")).finding}
    assert not_found and _warned(md) == not_found
    assert "Findings: 0 of 2 component circuits and 0 of 2 feature circuits" in md


def _validated(st: dict, rel: str) -> None:
    v = st["validation"]["relations"][rel]
    v["held_out"].update(faithfulness=0.9, ci=[0.8, 1.0], random_p=0.005, random_draws=199, node_share=0.05,
                         degenerate=False)
    v["validated"] = True


def test_validated_circuits_count_and_below_bar_dictionaries_warn(run, tmp_path):
    good = {"explained_variance": 0.9, "ce_loss_score": 0.9, "dead_fraction": 0.01, "l0": 64.0}

    def edit(st):
        _validated(st, "capital_city")
        st["dictionaries"]["layers"] = {f"blocks.{i}.ln2.hook_normalized->blocks.{i}.hook_mlp_out":
                                        dict(good, ce_loss_score=-1.4 if i == 1 else 0.9) for i in range(2)}
        st["dictionaries"].pop("dictionary_quality", None)  # a stage without the quality contract: computed
        for rel in st["feature_circuits"]["relations"]:
            fv = st["feature_circuits"]["relations"][rel]["validation"]
            fv.pop("dictionary_quality", None)
            fv.update(held_out_faithfulness=0.95, held_out_ci=[0.9, 1.0])
            fv["held_out"].update(faithfulness=0.95, ci=[0.9, 1.0], random_p=0.001, random_draws=999, node_share=0.05,
                                  degenerate=False)

    out = _rewrite(run, tmp_path / "r", edit)
    md = (out / "report.md").read_text("utf-8")
    assert "Findings: 1 of 2 component circuits and 0 of 2 feature circuits pass their checks: capital_city." in md
    assert _warned(md) == {"city_country", "capital_city/features", "city_country/features"}
    warn = re.search(r"\*\*Warning — capital_city/features: not a finding\.\*\*([^\n]*)", md).group(1)
    assert "below the dictionary quality bar at 1 layer(s) (1)" in warn
    assert "**What to do about the dictionaries:** treat this feature circuit as a description" in md
    feat = next(t for t in parse_tables(md) if t.section.startswith("Feature circuits") and t.header[0] == "circuit")
    col = feat.header.index("dictionaries meet the bar")
    assert {r[col] for r in feat.rows} == {"**no**"}
    assert inconsistencies(out) == []
    for r in warn.split(";"):  # the dictionaries are the only reason left
        assert "dictionary quality bar" in r


def test_the_feature_stages_quality_contract_is_used(run, tmp_path):
    below = {"meets_bar": False, "bar": {}, "layers_below_bar": ["blocks.2.mlp.hook_in->blocks.2.hook_mlp_out",
                                                                 "blocks.3.mlp.hook_in->blocks.3.hook_mlp_out"],
             "source": "trained here", "advice": "raise sae_training_tokens"}

    def edit(st):
        for rel in st["feature_circuits"]["relations"]:
            st["feature_circuits"]["relations"][rel]["validation"]["dictionary_quality"] = below

    md = (_rewrite(run, tmp_path / "r", edit) / "report.md").read_text("utf-8")
    warn = re.search(r"\*\*Warning — city_country/features: not a finding\.\*\*([^\n]*)", md).group(1)
    assert "below the dictionary quality bar at 2 layer(s) (2-3)" in warn
    assert "**What to do about the dictionaries:** raise sae_training_tokens." in md


def test_circuit_finding_is_the_one_decision():
    ok = {"held_out_faithfulness": 0.9, "held_out_ci": [0.75, 1.0], "random_baseline_p": 0.005, "node_share": 0.05,
          "validated": True, "degenerate": False}
    assert circuit_finding(ok) == Finding(True)
    assert circuit_finding({**ok, "random_baseline_p": 0.03}).reasons == (
        "it does not beat matched random circuits at p < 0.01 (p = 0.030)",)
    assert not circuit_finding({**ok, "held_out_ci": [0.45, 1.0]}).finding
    assert not circuit_finding({**ok, "node_share": 0.2}).finding
    assert "degenerate" in circuit_finding({**ok, "degenerate": True}).reasons[0]
    assert not circuit_finding(None).finding
    # feature circuits: the contract's dictionary_quality entry wins; otherwise it is computed from the layers
    meets = {"meets_bar": True, "bar": {}, "layers_below_bar": [], "source": "validation", "advice": ""}
    assert circuit_finding({**ok, "dictionary_quality": meets}, "feature").finding
    below = {**meets, "meets_bar": False, "layers_below_bar": [3], "advice": "retrain layer 3"}
    st = circuit_finding({**ok, "dictionary_quality": below}, "feature")
    assert not st.finding and st.advice == "retrain layer 3" and "retrain layer 3" in (st.warning() or "")
    layers = {"blocks.0.ln2.hook_normalized->blocks.0.hook_mlp_out":
              {"explained_variance": 0.81, "ce_loss_score": 0.86, "dead_fraction": 0.1, "l0": 64.0},
              "blocks.7.ln2.hook_normalized->blocks.7.hook_mlp_out":
              {"explained_variance": 0.81, "ce_loss_score": 0.86, "dead_fraction": 0.11, "l0": 64.0}}
    dq = dictionary_quality({}, {"layers": layers})
    assert dq is not None and dq["layers_below_bar"] == [7] and not dq["meets_bar"] and dq["advice"]
    assert not circuit_finding(ok, "feature", {"layers": layers}).finding
    assert circuit_finding(ok, "feature", {"layers": {k: layers[k] for k in list(layers)[:1]}}).finding
    assert "unknown" in circuit_finding(ok, "feature").reasons[0]  # no quality at all: not a finding
    with pytest.raises(ValueError):
        circuit_finding(ok, "edge")
