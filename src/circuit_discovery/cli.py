"""The ``frc`` command line (``python main.py`` runs ``frc run``).

Errors a user can fix print one line on stderr and exit with code 2, never a traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import CircuitDiscoveryError
from .pipeline.config import RunConfig as _Defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Find and test the circuits with which transformer LMs recall facts.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with run options ([run] table)."),
    quick: bool = typer.Option(False, "--quick", help="Small run: 4 relations, 6 discovery and 4 held-out facts each."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: outputs/circuit_discovery_<time>]"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, folder or hub id [default: gemma-3-270m]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    relations: Optional[list[str]] = typer.Option(None, "--relations", help="Relations to run (comma-separated or repeated)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Facts JSON: seed, rich, known_1000 or CounterFact format."),
    max_facts: Optional[int] = typer.Option(None, "--max-facts", help=f"Discovery facts per relation [default: {_Defaults.max_facts}]"),
    held_out_facts: Optional[int] = typer.Option(None, "--held-out-facts", help=f"Held-out facts per relation, split off before pairing [default: {_Defaults.held_out_facts}]"),
    n_random: Optional[int] = typer.Option(None, "--n-random", help=f"Matched random circuits per baseline [default: {_Defaults.n_random}]"),
    known_k: Optional[int] = typer.Option(None, "--known-k", help=f"A fact is known when its answer ranks <= k [default: {_Defaults.known_k}]"),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished stages in --out."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide progress bars."),
) -> None:
    """Run the whole pipeline and write a report folder."""
    from .pipeline import RunConfig, run_pipeline

    if dataset is not None and not dataset.exists():
        _fail(f"dataset file {dataset} does not exist; check the path")
    if resume and out is None:
        _fail("--resume needs --out pointing at the run folder to resume")
    overrides = dict(quick=quick or None, out=str(out) if out else None, model=model, device=device, seed=seed,
                     relations=_split(relations), dataset=str(dataset) if dataset else None, max_facts=max_facts,
                     held_out_facts=held_out_facts, n_random=n_random, known_k=known_k, resume=resume or None, progress=False if no_progress else None)
    result = _guarded(lambda: run_pipeline(
        RunConfig.from_toml(config, **overrides) if config is not None
        else RunConfig(**{k: v for k, v in overrides.items() if v is not None})))
    _summary_table(result)
    typer.echo(str(result.out_dir))


def _guarded(fn):
    """Run ``fn``; errors a user can fix become one line on stderr and exit code 2."""
    try:
        return fn()
    except CircuitDiscoveryError as e:
        _fail(str(e))
    except (ValueError, OSError) as e:  # typed input errors from lower layers (DatasetError is a ValueError)
        if type(e).__module__.startswith("circuit_discovery") or isinstance(e, (FileNotFoundError, PermissionError)):
            _fail(str(e))
        raise


# ---------------------------------------------------------------------------------------- stage subcommands
_OUT = typer.Option(..., "--out", help="The run folder (created by the first stage, reused by the later ones).")


def _stage_config(out: Path, config: Optional[Path], **overrides):
    """The folder's saved run configuration (``stages/run_config.json``, written by every stage), else
    ``--config``, else the defaults; options given on the command line override it. Always resumes."""
    import dataclasses

    from .io import read_json
    from .pipeline import RunConfig

    saved = out / "stages" / "run_config.json"
    over = {k: v for k, v in overrides.items() if v is not None}
    over.update(out=str(out), resume=True)
    if config is not None:
        return RunConfig.from_toml(config, **over)
    if saved.is_file():
        data = read_json(saved)
        known = {f.name for f in dataclasses.fields(RunConfig)}
        data = {k: v for k, v in data.items() if k in known}
        data.update(over)
        return RunConfig(**data)
    return RunConfig(**over)


def _run_stages(out: Path, only: tuple[str, ...], config: Optional[Path], **overrides):
    from .pipeline import run_pipeline

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is not a folder")
    return _guarded(lambda: run_pipeline(_stage_config(out, config, **overrides), only=only))


def _common(model, quick, relations, seed, no_progress):
    return dict(model=model, quick=quick or None, relations=_split(relations), seed=seed,
                progress=False if no_progress else None)


_MODEL = typer.Option(None, "--model", help="Model [default: the folder's saved config, else gemma-3-270m]")
_QUICK = typer.Option(False, "--quick", help="Small run: 4 relations, 6 discovery and 4 held-out facts each.")
_RELS = typer.Option(None, "--relations", help="Relations (comma-separated or repeated).")
_SEED = typer.Option(None, "--seed", help="Random seed [default: the folder's saved config, else 0]")
_NOPROG = typer.Option(False, "--no-progress", help="Hide progress bars.")
_CONFIG = typer.Option(None, "--config", help="TOML file with run options ([run] table).")


@app.command()
def attribute(out: Path = _OUT, config: Optional[Path] = _CONFIG, model: Optional[str] = _MODEL, quick: bool = _QUICK,
              relations: Optional[list[str]] = _RELS, seed: Optional[int] = _SEED, no_progress: bool = _NOPROG) -> None:
    """Stages known, attribution (activation patching) and causal tracing into --out."""
    _run_stages(out, ("known", "attribution", "causal_tracing"), config, **_common(model, quick, relations, seed,
                                                                                   no_progress))
    typer.echo(str(out))


@app.command("train-sae")
def train_sae(out: Path = _OUT, config: Optional[Path] = _CONFIG, model: Optional[str] = _MODEL,
              layers: Optional[list[str]] = typer.Option(None, "--layers", help="Layers [default: all]"),
              training_tokens: Optional[int] = typer.Option(None, "--training-tokens",
                                                            help=f"Tokens per transcoder [default: {_Defaults.sae_training_tokens}]"),
              k: Optional[int] = typer.Option(None, "--k", help=f"TopK active latents [default: {_Defaults.sae_k}]"),
              eval_tokens: Optional[int] = typer.Option(None, "--eval-tokens",
                                                        help=f"Held-out tokens per layer for metrics [default: {_Defaults.sae_eval_tokens}]"),
              no_progress: bool = _NOPROG) -> None:
    """Train (or reuse from the cache) one transcoder per layer; metrics go to --out/stages/dictionaries.json."""
    try:
        lay = [int(x) for x in _split(layers)] if layers else None
    except ValueError:
        _fail(f"--layers must be integers, got {layers}")
    _run_stages(out, ("dictionaries",), config, model=model, sae_layers=lay, sae_training_tokens=training_tokens,
                sae_k=k, sae_eval_tokens=eval_tokens, progress=False if no_progress else None)
    typer.echo(str(out))


@app.command()
def circuits(out: Path = _OUT, config: Optional[Path] = _CONFIG, model: Optional[str] = _MODEL, quick: bool = _QUICK,
             relations: Optional[list[str]] = _RELS, seed: Optional[int] = _SEED, no_progress: bool = _NOPROG,
             features: Optional[bool] = typer.Option(None, "--features/--no-features",
                                                     help="Also build transcoder feature circuits [default: yes]")) -> None:
    """Component circuits (and feature circuits with their validation) per relation into --out."""
    _run_stages(out, ("known", "circuits", "dictionaries", "feature_circuits"), config, features=features,
                **_common(model, quick, relations, seed, no_progress))
    typer.echo(str(out))


@app.command()
def validate(out: Path = _OUT, config: Optional[Path] = _CONFIG, no_progress: bool = _NOPROG) -> None:
    """Validate the circuits in --out (faithfulness, baselines, held-out facts) and test the hypotheses."""
    _run_stages(out, ("validation", "hypotheses"), config, progress=False if no_progress else None)
    typer.echo(str(out))


@app.command()
def report(out: Path = _OUT, config: Optional[Path] = _CONFIG) -> None:
    """Write report.md, circuits.json, metrics.json, figures and the viewer from the stages in --out."""
    res = _run_stages(out, ("report",), config)
    _summary_table(res)
    typer.echo(str(out / "report.md"))


@app.command()
def view(out: Path = _OUT,
         open_browser: bool = typer.Option(False, "--open", help="Open the viewer in the default browser.")) -> None:
    """(Re)write the offline viewer index.html from --out/circuits.json and print its path."""
    from .io import read_json
    from .report.viewer import write_viewer

    cj = out / "circuits.json"
    if not cj.is_file():
        _fail(f"{cj} does not exist; run `frc report --out {out}` (or `frc run`) first")
    path = _guarded(lambda: write_viewer(out, read_json(cj)))
    if open_browser:
        import webbrowser

        webbrowser.open(Path(path).resolve().as_uri())
    typer.echo(str(path))


def _summary_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Circuits")
    for col in ("relation", "facts", "nodes", "attribution score", "faithfulness"):
        t.add_column(col)
    for c in result.circuits:
        f = "—" if c.faithfulness is None else f"{c.faithfulness:.2f}"
        a = "—" if c.attribution_score is None else f"{c.attribution_score:.2f}"
        t.add_row(c.name, str(c.n_facts), str(len(c.nodes)), a, f)
    Console(stderr=True).print(t)


@app.command("models")
def models_cmd() -> None:
    """List the built-in models."""
    from .models import BUILTIN_MODELS, TINY_MODELS

    for b in BUILTIN_MODELS.values():
        typer.echo(f"{b.name:16s} {b.description}")
    for t in TINY_MODELS:
        typer.echo(f"{t:16s} tiny random model for tests")


@app.command("relations")
def relations_cmd() -> None:
    """List the built-in relations and their fact counts (* : not in the default run; name it with --relations)."""
    from .facts import load_builtin

    ds = load_builtin(include_non_default=True)
    for name, n in ds.counts().items():
        mark = "" if ds.relations[name].default else "  * not in the default run (too few known facts)"
        typer.echo(f"{name:24s} {n}{mark}")


def main(argv: Optional[list[str]] = None, default_command: Optional[str] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if default_command and (not args or args[0].startswith("-")) and args[:1] != ["--help"]:
        args = [default_command] + args
    app(args=args, prog_name="frc")


if __name__ == "__main__":
    main()
