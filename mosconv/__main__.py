"""``python -m mosconv``: the command line, the same as ``mosconv``."""

from .cli.commands import main

main(prog_name="mosconv")
