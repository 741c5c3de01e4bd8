"""``python -m mosconv``: the command line, the same as ``mosconv``."""

from .cli.commands import main

if __name__ == "__main__":  # run as a module; importing it (a docs or typing check) runs nothing
    main(prog_name="mosconv")
