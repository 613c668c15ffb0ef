"""The ``frc`` command line (``python main.py`` runs ``frc run``).

Errors a user can fix print one line on stderr and exit with code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import typer

from circuit_discovery.errors import CircuitDiscoveryError
from circuit_discovery.models.loading import DEFAULT_MODEL
from circuit_discovery.pipeline.config import DEVICES, SAE_KINDS
from circuit_discovery.pipeline.config import RunConfig as _Defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find and test the circuits with which transformer LMs recall facts.")

#: exit code of an error a user can fix (one line on stderr)
EXIT_BAD_INPUT = 2

#: command-line parameters whose RunConfig field has another name (every other parameter of a command that builds
#: a RunConfig is named like its field, except ``config``; ``tests/unit/test_cli.py`` checks both)
FIELD_OF = {"no_progress": "progress", "layers": "sae_layers", "training_tokens": "sae_training_tokens",
            "k": "sae_k", "eval_tokens": "sae_eval_tokens", "kind": "sae_kind"}

_DICT_HELP = ("Load the transcoders instead of training them: a local folder or file, or a Hugging Face repo id/path "
              "in the local cache (see README, 'Dictionaries').")
_KIND_HELP = f"Transcoders to train: {', '.join(SAE_KINDS)} [default: {_Defaults.sae_kind}]"

_QUICK_HELP = (f"Small run: {_Defaults.quick_relations} relations, {_Defaults.quick_facts} discovery and "
               f"{_Defaults.quick_held_out} held-out facts each.")


def _fail(msg: str) -> NoReturn:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank sees the same command-line error: say it once
        typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _say(text: str) -> None:
    """Print ``text`` once: on rank 0 of a torchrun launch (every process otherwise)."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(text)


def _is_rank0(result) -> bool:
    return not getattr(result, "rank", 0)


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _config(config: Path | None, **overrides):
    """``--config`` (else the defaults) with the options given on the command line (those not ``None``)."""
    from circuit_discovery.pipeline import RunConfig

    if config is not None:
        return RunConfig.from_toml(config, **overrides)
    return RunConfig(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def run(
    config: Path | None = typer.Option(None, "--config", help="TOML file with run options ([run] table)."),
    quick: bool = typer.Option(False, "--quick", help=_QUICK_HELP),
    out: Path | None = typer.Option(None, "--out", help="Output folder [default: outputs/circuit_discovery_<time>]"),
    model: str | None = typer.Option(None, "--model", help=f"Model name, folder or hub id [default: {DEFAULT_MODEL}]"),
    device: str | None = typer.Option(None, "--device", help=f"{', '.join(DEVICES)} [default: {_Defaults.device}]"),
    seed: int | None = typer.Option(None, "--seed", help=f"Random seed [default: {_Defaults.seed}]"),
    sae_seed: int | None = typer.Option(None, "--sae-seed", help=f"Seed of the transcoders' training (independent of "
                                                                f"--seed) [default: {_Defaults.sae_seed}]"),
    relations: list[str] | None = typer.Option(None, "--relations",
                                               help="Relations to run (comma-separated or repeated)."),
    dataset: Path | None = typer.Option(None, "--dataset",
                                        help="Facts JSON: seed, rich, known_1000 or CounterFact format."),
    max_facts: int | None = typer.Option(None, "--max-facts",
                                         help=f"Discovery facts per relation [default: {_Defaults.max_facts}]"),
    held_out_facts: int | None = typer.Option(None, "--held-out-facts",
                                              help=f"Held-out facts per relation, split off before pairing "
                                                   f"[default: {_Defaults.held_out_facts}]"),
    n_random: int | None = typer.Option(None, "--n-random",
                                        help=f"Matched random circuits per baseline [default: {_Defaults.n_random}]"),
    known_k: int | None = typer.Option(None, "--known-k",
                                       help=f"A fact is known when its answer ranks <= k "
                                            f"[default: {_Defaults.known_k}]"),
    dictionaries: str | None = typer.Option(None, "--dictionaries", help=_DICT_HELP),
    sae_kind: str | None = typer.Option(None, "--sae-kind", help=_KIND_HELP),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished stages in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Run the whole pipeline and write a report folder. Options given here override --config; the others keep
    the file's values (else the defaults)."""
    from circuit_discovery.pipeline import run_pipeline

    if dataset is not None and not dataset.exists():
        _fail(f"dataset file {dataset} does not exist; check the path")
    if resume and out is None:
        _fail("--resume needs --out pointing at the run folder to resume")
    overrides = dict(quick=quick or None, out=str(out) if out else None, model=model, device=device, seed=seed,
                     sae_seed=sae_seed, relations=_split(relations), dataset=str(dataset) if dataset else None,
                     max_facts=max_facts, held_out_facts=held_out_facts, n_random=n_random, known_k=known_k,
                     dictionaries=dictionaries, sae_kind=sae_kind, resume=resume or None,
                     progress=False if no_progress else None)
    cfg = _guarded(lambda: _config(config, **overrides))
    result = _guarded(lambda: run_pipeline(cfg))
    if not _is_rank0(result):
        return
    if cfg.dataset:
        _print_templates(Path(result.out_dir))
    _summary_table(result)
    typer.echo(str(result.out_dir))


def _print_templates(out_dir: Path) -> None:
    """The prompt template of each relation of the run's facts and how it was found (``stages/known.json``;
    seed-format subjects are the part of the prompt that varies between a relation's entries)."""
    import json

    from rich.console import Console

    known = out_dir / "stages" / "known.json"
    templates = json.loads(known.read_text()).get("templates", {}) if known.is_file() else {}
    if templates:
        lines = [f"  {rel}: {t}" for rel, ts in templates.items() for t in ts]
        Console(stderr=True).print("Relation templates:\n" + "\n".join(lines), highlight=False, markup=False)


def _guarded(fn):
    """Run ``fn``; errors a user can fix (every :class:`CircuitDiscoveryError`) become one line on stderr and exit
    code 2. Anything else is a bug and keeps its traceback."""
    try:
        return fn()
    except CircuitDiscoveryError as e:
        _fail(str(e))


# ---------------------------------------------------------------------------------------- stage subcommands
_OUT = typer.Option(..., "--out", help="The run folder (created by the first stage, reused by the later ones).")


def _read_json(path: Path, remedy: str):
    """A JSON file of a run folder; a damaged or unreadable one is a :class:`CircuitDiscoveryError`."""
    from circuit_discovery.io import read_json

    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise CircuitDiscoveryError(f"{path} cannot be read ({e}); {remedy}") from None


def _stage_config(out: Path, config: Path | None, **overrides):
    """``--config`` when given, else the folder's saved run configuration (``stages/run_config.json``, written by
    every stage), else the defaults; options given on the command line override it. Always resumes."""
    from circuit_discovery.pipeline import RunConfig

    saved = out / "stages" / "run_config.json"
    over = {k: v for k, v in overrides.items() if v is not None}
    over.update(out=str(out), resume=True)
    if config is not None:
        return _config(config, **over)
    if saved.is_file():
        return RunConfig.from_saved(_read_json(saved, "delete it, or give --config"), **over)
    return RunConfig(**over)


def _run_stages(out: Path, only: tuple[str, ...], config: Path | None, **overrides):
    from circuit_discovery.pipeline import run_pipeline

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is not a folder")
    return _guarded(lambda: run_pipeline(_stage_config(out, config, **overrides), only=only))


def _common(model, quick, relations, seed, no_progress):
    return dict(model=model, quick=quick or None, relations=_split(relations), seed=seed,
                progress=False if no_progress else None)


_MODEL = typer.Option(None, "--model", help=f"Model [default: the folder's saved config, else {DEFAULT_MODEL}]")
_QUICK = typer.Option(False, "--quick", help=_QUICK_HELP)
_RELS = typer.Option(None, "--relations", help="Relations (comma-separated or repeated).")
_SEED = typer.Option(None, "--seed", help=f"Random seed [default: the folder's saved config, else {_Defaults.seed}]")
_NOPROG = typer.Option(False, "--no-progress", help="Hide progress bars.")
_CONFIG = typer.Option(None, "--config", help="TOML file with run options ([run] table).")


@app.command()
def attribute(out: Path = _OUT, config: Path | None = _CONFIG, model: str | None = _MODEL, quick: bool = _QUICK,
              relations: list[str] | None = _RELS, seed: int | None = _SEED, no_progress: bool = _NOPROG) -> None:
    """Stages known, attribution (activation patching) and causal tracing into --out."""
    _run_stages(out, ("known", "attribution", "causal_tracing"), config, **_common(model, quick, relations, seed,
                                                                                   no_progress))
    _say(str(out))


@app.command("train-sae")
def train_sae(out: Path = _OUT, config: Path | None = _CONFIG, model: str | None = _MODEL,
              layers: list[str] | None = typer.Option(None, "--layers", help="Layers [default: all]"),
              training_tokens: int | None = typer.Option(
                  None, "--training-tokens", help=f"Tokens per transcoder [default: {_Defaults.sae_training_tokens}]"),
              k: int | None = typer.Option(None, "--k", help=f"TopK active latents [default: {_Defaults.sae_k}]"),
              eval_tokens: int | None = typer.Option(
                  None, "--eval-tokens",
                  help=f"Held-out tokens per layer for metrics [default: {_Defaults.sae_eval_tokens}]"),
              sae_seed: int | None = typer.Option(None, "--sae-seed", help=f"Seed of the transcoders' training "
                                                  f"[default: the folder's saved config, else {_Defaults.sae_seed}]"),
              kind: str | None = typer.Option(None, "--kind", help=_KIND_HELP),
              no_progress: bool = _NOPROG) -> None:
    """Train (or reuse from the cache) one transcoder per layer; metrics go to --out/stages/dictionaries.json."""
    split = _split(layers)
    try:
        lay = [int(x) for x in split] if split is not None else None
    except ValueError:
        _fail(f"--layers must be integers, got {layers}")
    _run_stages(out, ("dictionaries",), config, model=model, sae_layers=lay, sae_training_tokens=training_tokens,
                sae_k=k, sae_eval_tokens=eval_tokens, sae_seed=sae_seed, sae_kind=kind,
                progress=False if no_progress else None)
    _say(str(out))


@app.command()
def circuits(out: Path = _OUT, config: Path | None = _CONFIG, model: str | None = _MODEL, quick: bool = _QUICK,
             relations: list[str] | None = _RELS, seed: int | None = _SEED, no_progress: bool = _NOPROG,
             features: bool | None = typer.Option(
                 None, "--features/--no-features", help="Also build transcoder feature circuits [default: yes]"),
             dictionaries: str | None = typer.Option(None, "--dictionaries", help=_DICT_HELP),
             sae_kind: str | None = typer.Option(None, "--sae-kind", help=_KIND_HELP),
             ) -> None:
    """Component circuits (and feature circuits with their validation) per relation into --out."""
    _run_stages(out, ("known", "circuits", "dictionaries", "feature_circuits"), config, features=features,
                dictionaries=dictionaries, sae_kind=sae_kind, **_common(model, quick, relations, seed, no_progress))
    _say(str(out))


@app.command()
def validate(out: Path = _OUT, config: Path | None = _CONFIG, no_progress: bool = _NOPROG) -> None:
    """Validate the circuits in --out (faithfulness, baselines, held-out facts) and test the hypotheses."""
    _run_stages(out, ("validation", "hypotheses"), config, progress=False if no_progress else None)
    _say(str(out))


@app.command()
def report(out: Path = _OUT, config: Path | None = _CONFIG) -> None:
    """Write report.md, circuits.json, metrics.json, figures and the viewer from the stages in --out."""
    res = _run_stages(out, ("report",), config)
    if _is_rank0(res):
        _summary_table(res)
        typer.echo(str(out / "report.md"))


@app.command()
def view(out: Path = _OUT,
         open_browser: bool = typer.Option(False, "--open", help="Open the viewer in the default browser.")) -> None:
    """(Re)write the offline viewer index.html from --out/circuits.json and print its path."""
    from circuit_discovery.report.viewer import write_viewer

    cj = out / "circuits.json"
    if not cj.is_file():
        _fail(f"{cj} does not exist; run `frc report --out {out}` (or `frc run`) first")
    path = _guarded(lambda: write_viewer(out, _read_json(cj, f"rewrite it with `frc report --out {out}`")))
    if open_browser:
        import webbrowser

        webbrowser.open(Path(path).resolve().as_uri())
    typer.echo(str(path))


def _summary_table(result) -> None:
    """One row per circuit: facts used, its size, held-out faithfulness, the matched-baseline p and whether it is a
    finding (``report_stage.circuit_finding``, the report's rule), with the short reasons (:data:`SHORT_REASONS`) of
    its failed checks when it is not."""
    from rich.console import Console
    from rich.table import Table

    from circuit_discovery.pipeline.report_stage import circuit_finding

    if not _is_rank0(result):
        return
    metrics_path = Path(result.out_dir) / "metrics.json"
    metrics = _read_json(metrics_path, "rewrite it with `frc report --out DIR`") if metrics_path.is_file() else {}
    t = Table(title="Circuits")
    for col in ("circuit", "facts (disc. / held out)", "nodes (non-inert)", "held-out f [95% CI]", "random p",
                "finding"):
        t.add_column(col)
    for c in result.circuits:
        feature = c.name.endswith("/features")
        table = metrics.get("feature_circuits" if feature else "relations") or {}
        m = table.get(c.relation) or {}
        fnd = circuit_finding(m, "feature" if feature else "component", metrics.get("dictionaries"))
        f, ci = m.get("held_out_faithfulness"), m.get("held_out_ci") or [None, None]
        fs = "—" if f is None else (f"{f:.2f}" + ("" if ci[0] is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"))
        p = m.get("random_baseline_p")
        n_disc, n_held = m.get("n_discovery", c.n_facts), m.get("n_held_out", "—")
        verdict = "yes" if fnd.finding else "no: " + ", ".join(_short_reasons(fnd.codes))
        t.add_row(c.name, f"{n_disc} / {n_held}", str(m.get("circuit_size", len(c.nodes))), fs,
                  "—" if p is None else f"{p:.3f}", verdict)
    Console(stderr=True, width=max(Console(stderr=True).width, 110)).print(t)


#: A few words per failed check of ``report_stage.circuit_finding`` (its ``Finding.codes``, the keys of
#: ``report_stage.FINDING_CODES``) for the summary table; report.md gives the sentences.
SHORT_REASONS = {"no_validation": "not validated", "degenerate": "degenerate", "held_out_faithfulness": "held-out f",
                 "random_baseline": "random p", "circuit_size": "size", "dictionary_quality_unknown": "dictionaries",
                 "dictionary_quality": "dictionaries", "not_validated": "not validated"}


def _short_reasons(codes) -> list[str]:
    """The short reasons (:data:`SHORT_REASONS`) of a finding's failed-check ``codes``, each once, in order."""
    out: list[str] = []
    for code in codes:
        word = SHORT_REASONS.get(code, code)
        if word not in out:
            out.append(word)
    return out or ["not validated"]


cache_app = typer.Typer(no_args_is_help=True, help="The model cache (~/.cache/circuit_discovery).")
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(model: str | None = typer.Option(None, "--model", help="A built-in model [default: every cached one]"),
                 cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Cache root [default: "
                                                        "$CIRCUIT_DISCOVERY_CACHE or ~/.cache/circuit_discovery]")
                 ) -> None:
    """Rehash every cached model file against its manifest. Exit 2 when a cache is damaged (the line says what to
    do); a model never cached is not damage."""
    from circuit_discovery.models.loading import verify_model_cache

    res = _guarded(lambda: verify_model_cache(model, cache_dir=cache_dir))
    for name, m in res["models"].items():
        typer.echo(f"{name}: {m['status']} ({m['folder']}, {len(m.get('rehashed') or [])} files rehashed)")
    bad = [f"{name}: {'; '.join(m['problems'])}. {m['fix']}" for name, m in res["models"].items()
           if m["status"] == "damaged"]
    if bad:
        _fail(" | ".join(bad))
    if not res["models"]:
        typer.echo(f"no cached built-in model under {res['cache_dir']}")


@app.command("estimate")
def estimate_cmd(model: str | None = typer.Option(None, "--model", help=f"Model name [default: {DEFAULT_MODEL}]"),
                 facts: int | None = typer.Option(None, "--facts", help="Facts given to the known filter "
                                                   "[default: the built-in dataset]"),
                 device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Predicted peak memory and time per stage of a default run (first-order scaling of measured runs;
    docs/scaling.md)."""
    import json

    from circuit_discovery.estimate import estimate, format_estimate

    est = _guarded(lambda: estimate(model, facts, device))
    typer.echo(json.dumps(est, indent=1) if as_json else format_estimate(est))


@app.command("models")
def models_cmd() -> None:
    """List the built-in models."""
    from circuit_discovery.models import BUILTIN_MODELS, TINY_MODELS

    for b in BUILTIN_MODELS.values():
        typer.echo(f"{b.name:16s} {b.description}")
    for t in TINY_MODELS:
        typer.echo(f"{t:16s} tiny random model for tests")


@app.command("relations")
def relations_cmd() -> None:
    """List the built-in relations and their fact counts (* : not in the default run; name it with --relations)."""
    from circuit_discovery.facts import load_builtin

    ds = load_builtin(include_non_default=True)
    for name, n in ds.counts().items():
        mark = "" if ds.relations[name].default else "  * not in the default run (too few known facts)"
        typer.echo(f"{name:24s} {n}{mark}")


def main(argv: list[str] | None = None, default_command: str | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if default_command and (not args or args[0].startswith("-")) and args[:1] != ["--help"]:
        args = [default_command] + args
    app(args=args, prog_name="frc")


if __name__ == "__main__":
    main()
