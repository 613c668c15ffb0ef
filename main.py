"""Run the whole pipeline on the built-in model and facts: ``python main.py [--quick] [options]``."""
from circuit_discovery.cli import main

main(default_command="run")
