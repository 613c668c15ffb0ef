"""Run the whole pipeline on the built-in model and facts: ``python main.py [--quick] [options]``, or spread over
processes, GPUs and machines with ``torchrun --standalone --nproc-per-node N main.py [options]`` (docs/distributed.md).
"""
from circuit_discovery.cli import main

main(default_command="run")
