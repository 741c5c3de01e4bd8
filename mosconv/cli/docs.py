"""Render ``docs/cli.md`` from the commands' own ``--help`` (checked by tests/test_cli_docs.py).

    python -m mosconv.cli.docs > docs/cli.md
"""

from __future__ import annotations

import click

WIDTH = 100
HELP = ["-h", "--help"]  # as main's context_settings (click caches the help option per command)


def _help(cmd: click.Command, name: str, parent: click.Context | None = None) -> str:
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=WIDTH,
                        max_content_width=WIDTH, help_option_names=HELP)
    return ctx.get_help()


def render() -> str:
    from .commands import main

    root = click.Context(main, info_name="mosconv", terminal_width=WIDTH, max_content_width=WIDTH,
                         help_option_names=HELP)
    out = [
        "# Command-line reference",
        "",
        "Generated from `mosconv --help` and each command's `--help` by",
        "`python -m mosconv.cli.docs > docs/cli.md`; a test fails when this page and the",
        "program disagree. Exit codes: 0 ok, 1 failure (a one-line `mosconv: error: ...`),",
        "2 usage error.",
        "",
        "Shell completion (click): add one of these lines to your shell's startup file:",
        "",
        "```bash",
        'eval "$(_MOSCONV_COMPLETE=bash_source mosconv)"   # ~/.bashrc',
        'eval "$(_MOSCONV_COMPLETE=zsh_source mosconv)"    # ~/.zshrc',
        "_MOSCONV_COMPLETE=fish_source mosconv | source    # ~/.config/fish/completions/mosconv.fish",
        "```",
        "",
        "## mosconv",
        "",
        "```text",
        _help(main, "mosconv"),
        "```",
    ]
    for name in sorted(main.commands):
        out += ["", f"## mosconv {name}", "", "```text",
                _help(main.commands[name], name, root), "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
