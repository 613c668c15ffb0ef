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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
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
    quick: bool = typer.Option(False, "--quick", help="Small run: 4 relations, 3 facts each."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder [default: outputs/circuit_discovery_<time>]"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name, folder or hub id [default: gemma-3-270m]"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    relations: Optional[list[str]] = typer.Option(None, "--relations", help="Relations to run (comma-separated or repeated)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Facts JSON: seed, rich, known_1000 or CounterFact format."),
    max_facts: Optional[int] = typer.Option(None, "--max-facts", help="Facts per relation used for attribution [default: 8]"),
    known_k: Optional[int] = typer.Option(None, "--known-k", help="A fact is known when its answer ranks <= k [default: 1]"),
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
                     known_k=known_k, resume=resume or None, progress=False if no_progress else None)
    try:
        if config is not None:
            cfg = RunConfig.from_toml(config, **overrides)
        else:
            cfg = RunConfig(**{k: v for k, v in overrides.items() if v is not None})
        result = run_pipeline(cfg)
    except CircuitDiscoveryError as e:
        _fail(str(e))
    except (ValueError, OSError) as e:  # typed input errors from lower layers (DatasetError is a ValueError)
        if type(e).__module__.startswith("circuit_discovery") or isinstance(e, (FileNotFoundError, PermissionError)):
            _fail(str(e))
        raise
    _summary_table(result)
    typer.echo(str(result.out_dir))


def _summary_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Circuits")
    for col in ("relation", "facts", "nodes", "attribution score", "faithfulness"):
        t.add_column(col)
    for c in result.circuits:
        f = "—" if c.faithfulness is None else f"{c.faithfulness:.2f}"
        t.add_row(c.name, str(c.n_facts), str(len(c.nodes)), f"{c.attribution_score:.2f}", f)
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
    """List the built-in relations and their fact counts."""
    from .facts import load_builtin

    ds = load_builtin()
    for name, n in ds.counts().items():
        typer.echo(f"{name:24s} {n}")


def main(argv: Optional[list[str]] = None, default_command: Optional[str] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    if default_command and (not args or args[0].startswith("-")) and args[:1] != ["--help"]:
        args = [default_command] + args
    app(args=args, prog_name="frc")


if __name__ == "__main__":
    main()
