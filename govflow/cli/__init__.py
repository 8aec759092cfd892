"""The ``govflow`` command line: one entry point, and one line on stderr per error."""

from govflow.cli.app import main

__all__ = ["main"]
