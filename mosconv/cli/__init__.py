"""The ``mosconv`` command line (``commands``: parse, call the library, render; ``plot``: PNG
rendering of reports; ``docs``: docs/cli.md from the commands' own help)."""

from .commands import main

__all__ = ["main"]
