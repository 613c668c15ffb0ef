"""Stages, configuration, resume and progress of the end-to-end run."""
from .config import ConfigError, OutputError, RunConfig
from .run import Run, RunResult, run_pipeline, safe_name

__all__ = ["ConfigError", "OutputError", "RunConfig", "Run", "RunResult", "run_pipeline", "safe_name"]
