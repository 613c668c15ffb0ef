"""CLI: bad input gives one line on stderr and exit code 2; a tiny-model run writes the report folder."""
import dataclasses
import json
from pathlib import Path

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


# ------------------------------------------------------------------------ --config and command-line options
def _config_commands():
    """Every command that builds a RunConfig (takes --config), with its click command."""
    from typer.main import get_command

    cmds = get_command(app).commands
    return {name: cmd for name, cmd in cmds.items() if any(p.name == "config" for p in cmd.params)}


def _options():
    """(command, parameter) for every option that sets a RunConfig field (the stage commands' required --out is the
    run folder and is not an override)."""
    return [(name, p) for name, cmd in sorted(_config_commands().items()) for p in cmd.params
            if p.name not in ("config", "help") and not (name != "run" and p.name == "out")]


OPTIONS = _options()


def _field(param) -> str:
    from circuit_discovery.cli import FIELD_OF

    return FIELD_OF.get(param.name, param.name)


def _samples(field, tmp_path):
    """(value in the file, value on the command line) of a field: both valid and different from its default and
    from each other."""
    from circuit_discovery.pipeline.config import RunConfig, _hints

    special = {"device": ("cpu", "cuda:1"), "relations": (["capital_city", "city_country"], ["landmark_country"]),
               "sae_layers": ([1, 2], [3]), "out": (str(tmp_path / "file_out"), str(tmp_path / "cli_out")),
               "dataset": (str(tmp_path / "file.json"), str(tmp_path / "cli.json")),
               "sae_kind": ("clt", "jumprelu_transcoder"),
               "dictionaries": (str(tmp_path / "file_dicts"), str(tmp_path / "cli_dicts"))}
    if field in special:
        return special[field]
    hint, default = _hints()[field], getattr(RunConfig(), field)
    args = set(getattr(hint, "__args__", (hint,)))
    if int in args:
        return (default or 0) + 3, (default or 0) + 5
    if float in args:
        return default / 2, default / 4
    if str in args:
        return "from-file", "from-cli"
    raise AssertionError(f"no sample values for option {field}: add them to _samples")


def _toml_value(v) -> str:
    return json.dumps(v)  # JSON scalars and lists of strings/ints are TOML


def _invoke(monkeypatch, tmp_path, command, toml: dict, args):
    """Run ``command`` with a --config holding ``toml`` and ``args``; return the RunConfig it built (the pipeline
    is not run)."""
    import circuit_discovery.pipeline as pipeline
    from types import SimpleNamespace

    seen = []

    def fake_run_pipeline(cfg, only=None):
        seen.append(cfg)
        return SimpleNamespace(circuits=[], out_dir=Path(cfg.out or "x"))

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run_pipeline)
    cfg = write(tmp_path, "c.toml", "[run]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in toml.items()))
    stage = [] if command == "run" else ["--out", str(tmp_path / "stage")]
    res = runner.invoke(app, [command, *stage, "--config", str(cfg), *args])
    assert res.exit_code == 0, res.output
    assert len(seen) == 1
    return seen[0]


def test_every_option_maps_to_a_run_config_field():
    from circuit_discovery.pipeline.config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert {"run", "attribute", "train-sae", "circuits", "validate", "report"} <= set(_config_commands())
    assert {_field(p) for _, p in OPTIONS} <= fields, "name the option like its field or add it to cli.FIELD_OF"
    assert {"seed", "device", "sae_seed"} <= {_field(p) for c, p in OPTIONS if c == "run"}


@pytest.mark.parametrize("command, param", OPTIONS, ids=[f"{c}:{p.opts[0]}" for c, p in OPTIONS])
def test_config_file_keeps_its_values_unless_the_option_is_given(monkeypatch, tmp_path, command, param):
    """`frc <command> --config c.toml` keeps the file's value of every option not given on the command line
    (the CLI's defaults never override it); an option given on the command line overrides the file."""
    field = _field(param)
    (tmp_path / "cli.json").write_text("{}")  # --dataset must exist
    if param.is_flag:
        flag_args = [param.opts[0]] + (["--out", str(tmp_path / "o")] if field == "resume" and command == "run"
                                       else [])
        given = getattr(_invoke(monkeypatch, tmp_path, command, {}, flag_args), field)
        # the file holds the value the flag gives: it is kept without the flag
        assert getattr(_invoke(monkeypatch, tmp_path, command, {field: given}, []), field) == given
        if command != "run" and field == "resume":
            return
        # the file holds the other value: the flag overrides it
        assert getattr(_invoke(monkeypatch, tmp_path, command, {field: not given}, flag_args), field) == given
        for opt in param.secondary_opts:  # --features/--no-features: both directions
            assert getattr(_invoke(monkeypatch, tmp_path, command, {field: given}, [opt]), field) == (not given)
        return
    in_file, on_cli = _samples(field, tmp_path)
    assert getattr(_invoke(monkeypatch, tmp_path, command, {field: in_file}, []), field) == in_file
    arg = ",".join(map(str, on_cli)) if isinstance(on_cli, list) else str(on_cli)
    got = getattr(_invoke(monkeypatch, tmp_path, command, {field: in_file}, [param.opts[0], arg]), field)
    assert got == on_cli


def test_toml_seed_and_device_survive_frc_run(monkeypatch, tmp_path):
    """The reported bug: `frc run --config c.toml` ran with seed 0 and device auto whatever the file said."""
    cfg = _invoke(monkeypatch, tmp_path, "run", {"seed": 7, "device": "cpu", "sae_seed": 3}, [])
    assert (cfg.seed, cfg.device, cfg.sae_seed) == (7, "cpu", 3)
    cfg = _invoke(monkeypatch, tmp_path, "run", {"seed": 7, "device": "cpu"}, ["--seed", "0", "--device", "auto"])
    assert (cfg.seed, cfg.device) == (0, "auto")


def test_run_without_config_uses_the_defaults(monkeypatch, tmp_path):
    import circuit_discovery.pipeline as pipeline
    from types import SimpleNamespace

    from circuit_discovery.pipeline.config import RunConfig

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline",
                        lambda cfg, only=None: seen.append(cfg) or SimpleNamespace(circuits=[], out_dir=Path("x")))
    res = runner.invoke(app, ["run", "--sae-seed", "5"])
    assert res.exit_code == 0, res.output
    assert seen[0] == RunConfig(sae_seed=5)


@pytest.mark.parametrize("args, needles", [
    (["--device", "gpu"], ["device", "'gpu'", "cuda:N"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--sae-seed", "-2"], ["sae_seed", "-2"]),
    (["--known-k", "0"], ["known_k", ">= 1"]),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, args, needles):
    res = runner.invoke(app, ["run", "--model", "tiny-gemma3", "--out", str(tmp_path / "x"), *args])
    one_line_error(res, *needles)
    assert not (tmp_path / "x").exists()


def test_bad_closed_set_value_in_config_file_is_one_line(tmp_path):
    cfg = write(tmp_path, "c.toml", '[run]\nmetric = "logit-diff"\n')
    one_line_error(runner.invoke(app, ["run", "--config", str(cfg)]), "metric", "'logit-diff'", "logit_diff", "logprob")


def test_only_toolkit_errors_become_one_line(monkeypatch):
    """Errors a user can fix (CircuitDiscoveryError) are one line and exit code 2; anything else is a bug and keeps
    its traceback."""
    import circuit_discovery.pipeline as pipeline
    from circuit_discovery.errors import CircuitDiscoveryError

    def raise_(exc):
        def fn(cfg, only=None):
            raise exc
        return fn

    monkeypatch.setattr(pipeline, "run_pipeline", raise_(CircuitDiscoveryError("bad input; fix it")))
    one_line_error(runner.invoke(app, ["run"]), "bad input; fix it")
    monkeypatch.setattr(pipeline, "run_pipeline", raise_(ValueError("a bug")))
    res = runner.invoke(app, ["run"])
    assert res.exit_code != 2 and isinstance(res.exception, ValueError)


def test_stage_commands_read_old_saved_configs(monkeypatch, tmp_path):
    """A folder saved before sae_seed existed (with the removed top_nodes and extra) still resumes, with the
    transcoders' former seed."""
    import circuit_discovery.pipeline as pipeline
    from types import SimpleNamespace

    from circuit_discovery.pipeline.config import RunConfig

    out = tmp_path / "run"
    saved = RunConfig(seed=3).to_dict()
    del saved["sae_seed"]
    write(out / "stages" if (out / "stages").mkdir(parents=True) is None else out, "run_config.json",
          {**saved, "top_nodes": 12, "extra": {}})
    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline",
                        lambda cfg, only=None: seen.append(cfg) or SimpleNamespace(circuits=[], out_dir=out))
    res = runner.invoke(app, ["validate", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (seen[0].seed, seen[0].sae_seed, seen[0].resume) == (3, 45, True)


def test_damaged_saved_files_are_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "run_config.json").write_text("{damaged")
    one_line_error(runner.invoke(app, ["validate", "--out", str(out)]), "run_config.json", "--config")
    (out / "circuits.json").write_text("{damaged")
    one_line_error(runner.invoke(app, ["view", "--out", str(out)]), "circuits.json", "frc report")


# ------------------------------------------------------------------------------------- cache verify, estimate
def test_cache_verify_reports_a_same_size_corruption_in_one_line(tmp_path):
    """``frc cache verify`` rehashes whatever the stamps say: a same-size edit of a cached file is exit 2, one line
    naming the model and what to do; the untouched cache is exit 0."""
    from circuit_discovery.models.cache import write_manifest

    folder = tmp_path / "models" / "gemma-3-270m"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, model="gemma-3-270m")
    ok = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "gemma-3-270m: ok" in ok.output
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[4096:4096 + 1024] = bytes(1024)  # same size, other bytes
    (folder / "model.safetensors").write_bytes(bytes(data))
    bad = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2, bad.output
    err = [line for line in bad.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "gemma-3-270m" in err[0] and "rebuild" in err[0], bad.output
    empty = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path / "nothing")])
    assert empty.exit_code == 0 and "no cached built-in model" in empty.output
    unknown = runner.invoke(app, ["cache", "verify", "--model", "gpt-5", "--cache-dir", str(tmp_path)])
    assert unknown.exit_code == 2 and "not a built-in model" in unknown.output


def test_estimate_prints_every_stage_and_scales_with_the_model():
    small = runner.invoke(app, ["estimate", "--model", "gemma-3-270m", "--json"])
    assert small.exit_code == 0, small.output
    s = json.loads(small.output)
    assert set(s["stages"]) >= {"known", "circuits", "validation", "dictionaries", "feature_circuits"}
    assert s["peak_gb"] == max(v["peak_gb"] for v in s["stages"].values())
    big = json.loads(runner.invoke(app, ["estimate", "--model", "gemma-2-2b", "--json"]).output)
    assert big["peak_gb"] > s["peak_gb"] and big["total_seconds"] > s["total_seconds"]
    text = runner.invoke(app, ["estimate", "--model", "gemma-3-270m"])
    assert text.exit_code == 0 and "peak" in text.output
    bad = runner.invoke(app, ["estimate", "--model", "no-such-model-xyz"])
    assert bad.exit_code == 2 and bad.output.startswith("error:")


@pytest.mark.parametrize("kind", ["missing", "no_format", "pickle", "wrong_width"])
def test_bad_dictionaries_are_one_line_exit_2_and_nothing_is_written(tmp_path, kind):
    """``frc run --dictionaries SOURCE`` checks the set against the model before the run folder exists."""
    src = tmp_path / "dicts"
    if kind != "missing":
        src.mkdir()
    if kind == "no_format":
        (src / "notes.txt").write_text("not a dictionary")
    elif kind == "pickle":
        (src / "sae.pkl").write_bytes(b"\x80\x04K\x01.")
    elif kind == "wrong_width":  # a SAELens transcoder folder of width 7 (tiny-gemma3 has d_model 64)
        from safetensors.torch import save_file
        import torch

        cfg = {"architecture": "transcoder", "d_in": 7, "d_sae": 4, "d_out": 7, "dtype": "float32",
               "apply_b_dec_to_input": False, "normalize_activations": "none",
               "metadata": {"hook_name": "blocks.0.mlp.hook_in", "hook_name_out": "blocks.0.hook_mlp_out"}}
        (src / "cfg.json").write_text(json.dumps(cfg))
        save_file({"W_enc": torch.zeros(7, 4), "b_enc": torch.zeros(4), "W_dec": torch.zeros(4, 7),
                   "b_dec": torch.zeros(7)}, str(src / "sae_weights.safetensors"))
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "--model", "tiny-gemma3", "--quick", "--out", str(out), "--no-progress",
                              "--dictionaries", str(src)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert not out.exists()
