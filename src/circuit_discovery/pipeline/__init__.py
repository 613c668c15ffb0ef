"""Stages, configuration, resume and progress of the end-to-end run."""
from circuit_discovery.io import safe_name
from circuit_discovery.pipeline.config import ConfigError, OutputError, RunConfig
from circuit_discovery.pipeline.run import STAGES, Run, RunResult, discover_relation, run_pipeline

__all__ = ["ConfigError", "OutputError", "RunConfig", "Run", "RunResult", "STAGES", "discover_relation",
           "run_pipeline", "safe_name"]
