"""CLI: bad input gives one line on stderr and exit code 2; a tiny-model run writes the report folder."""
import json

import pytest
from typer.testing import CliRunner

from circuit_discovery.cli import app

runner = CliRunner()


def run(args):
    return runner.invoke(app, ["run", "--model", "tiny-gemma3", "--no-progress", *args])


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n.lower() in err.lower(), err
    return err


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize("content, needle", [
    ("{not json", "json"),
    ({}, "empty"),
    ({"entity_location": [{"clean": "The Eiffel Tower is in Paris"}]}, "corrupted"),
    ({"entity_location": [{"clean": "Paris is nice", "corrupted": "London is nice"}]}, "leading words"),
])
def test_bad_datasets(tmp_path, content, needle):
    ds = write(tmp_path, "d.json", content)
    out = tmp_path / "out"
    one_line_error(run(["--dataset", str(ds), "--out", str(out)]), needle)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_unknown_relation(tmp_path):
    one_line_error(run(["--relations", "capital_city,not_a_relation", "--out", str(tmp_path / "o")]),
                   "not_a_relation", "capital_city")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(run(["--out", str(blocker / "sub")]), "output")


def test_missing_dataset_file(tmp_path):
    one_line_error(run(["--dataset", str(tmp_path / "nope.json")]), "does not exist")


def test_prompt_longer_than_context(tmp_path):
    long = "The " + "very " * 400 + "long tower is located in"
    ds = write(tmp_path, "d.json", {"entity_location": [{"clean": long + " Paris", "corrupted": long + " Rome",
                                                      "subject": "The"}]})
    out = tmp_path / "out"
    one_line_error(run(["--dataset", str(ds), "--out", str(out)]), "context")
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_bad_config_file(tmp_path):
    cfg = write(tmp_path, "c.toml", "[run]\nnot_an_option = 1\n")
    one_line_error(runner.invoke(app, ["run", "--config", str(cfg)]), "not_an_option")


def test_bad_corpus_options_fail_before_any_work(tmp_path):
    cfg = write(tmp_path, "c.toml", '[run]\nsae_text_files = ["no/such/file.txt"]\n')
    one_line_error(runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "o")]), "no/such/file.txt")
    assert not (tmp_path / "o").exists()
    cfg = write(tmp_path, "d.toml", "[run]\nsae_corpus_sequences = 0\n")
    one_line_error(runner.invoke(app, ["run", "--config", str(cfg)]), "sae_corpus_sequences")


def test_corpus_options_reach_the_transcoders(tmp_path, monkeypatch):
    import circuit_discovery.sae.dictionaries as dicts
    from circuit_discovery.pipeline.config import RunConfig
    from circuit_discovery.pipeline.feature_stage import dictionaries

    text = tmp_path / "t.txt"
    text.write_text("Some text.\n\nMore text.\n", encoding="utf-8")
    seen = {}

    def fake(model, layers, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(dicts, "train_transcoders", fake)
    with pytest.raises(RuntimeError, match="stop"):
        dictionaries(None, RunConfig(sae_corpus_sequences=2048, sae_text_files=[str(text)]))
    assert seen["n_sequences"] == 2048 and seen["text_files"] == [str(text)]


def test_help_shows_defaults():
    from circuit_discovery.pipeline.config import RunConfig

    res = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--quick" in res.output
    # bracketed text is printed as written (no console markup eats "[run]" or "[default: ...]")
    assert f"[default: {RunConfig.max_facts}]" in res.output and "([run] table)" in res.output
    assert f"[default: {RunConfig.known_k}]" in res.output


def test_stage_subcommands_match_one_run(tmp_path):
    """attribute -> train-sae -> circuits -> validate -> report -> view on one folder gives the same circuits.json,
    metrics.json and hypotheses.csv as `frc run`; later stages reuse the folder's saved config; report before the
    circuits exist is a one-line error."""
    cfg = write(tmp_path, "run.toml", '[run]\nmodel = "tiny-gemma3"\nquick = true\nrelations = ["capital_city"]\n'
                                      'known_k = 1000000\nprogress = false\n')
    staged = tmp_path / "staged"
    res = runner.invoke(app, ["attribute", "--out", str(staged), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert (staged / "stages" / "attribution.json").is_file() and not (staged / "stages" / "circuits.json").exists()
    one_line_error(runner.invoke(app, ["report", "--out", str(staged)]), "frc circuits")
    res = runner.invoke(app, ["train-sae", "--out", str(staged), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (staged / "stages" / "dictionaries.json").is_file()
    for cmd in (["circuits", "--out", str(staged), "--no-progress"], ["validate", "--out", str(staged)],
                ["report", "--out", str(staged)]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, (cmd, res.output)
    assert res.stdout.strip().endswith("report.md")
    whole = tmp_path / "whole"
    res = runner.invoke(app, ["run", "--out", str(whole), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    for f in ("circuits.json", "metrics.json", "hypotheses.csv"):
        assert (staged / f).read_text() == (whole / f).read_text(), f
    (staged / "index.html").unlink()
    res = runner.invoke(app, ["view", "--out", str(staged)])
    assert res.exit_code == 0 and (staged / "index.html").is_file()
    one_line_error(runner.invoke(app, ["view", "--out", str(tmp_path / "nothing")]), "circuits.json")


def test_too_few_draws_or_facts_is_one_line_naming_the_minimum(tmp_path):
    """A run asking for fewer random draws or facts than its tests need is refused before any work."""
    for args, needle in ((["--n-random", "5"], "n_random must be an integer >= 19"),
                         (["--held-out-facts", "1"], "held_out_facts must be an integer >= 2"),
                         (["--max-facts", "3"], "max_facts must be an integer >= 4")):
        res = runner.invoke(app, ["run", "--model", "tiny-gemma3", "--out", str(tmp_path / "x"), *args])
        one_line_error(res, needle)
        assert not (tmp_path / "x").exists()
