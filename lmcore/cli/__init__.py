"""The command line (``lmcore <command>``): argument parsing and printing only; the work is done
by the library functions it calls."""

from lmcore.cli.main import main

__all__ = ["main"]
