"""Run the command line as ``python -m spectrum_cli``."""

from spectrum_cli.cli import entry

entry()
