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


def test_help_shows_defaults():
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "default" in res.output.lower()
