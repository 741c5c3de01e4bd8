"""The ``mosconv`` command line: parses, calls the library, renders.  No logic lives here.

Exit codes: 0 ok, 1 failure (bad input, failed conversion), 2 usage error.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import traceback

import click

from . import __version__
from .errors import MosconvError

log = logging.getLogger("mosconv")


def _fail(message: str) -> None:
    click.echo(f"mosconv: error: {message}", err=True)
    sys.exit(1)


def handle_errors(fn):
    """Turn library errors into a one-line message and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MosconvError as e:
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            _fail("interrupted")
        except Exception as e:  # a bug: say so in one line; -v shows the traceback
            if log.isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {str(e)[:300]} (rerun with -v for details)")

    return wrapper


def table(rows: list[list], headers: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mosconv")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and tracebacks of internal errors).")
def main(verbose: bool) -> None:
    """Convert trained LoRA adapters into Mixture-of-Shards adapters (arXiv 2410.00938).

    \b
    Typical use:
      mosconv inspect LORA_DIR              what the adapter holds, truncation errors
      mosconv compress LORA_DIR OUT --ratio 8
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="mosconv: %(message)s")


def render_lora_inspect(info: dict) -> str:
    out = [
        f"format        {info['format']}  (dtype {info['dtype']}"
        + (", fan_in_fan_out" if info["fan_in_fan_out"] else "") + ")",
        f"base model    {info['base_model'] or '-'}   task {info['task_type'] or '-'}",
        f"files         " + ", ".join(f"{f['path']} ({_fmt_bytes(f['bytes'])})" for f in info["files"]),
        f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ranks "
        f"{info['ranks']}, alpha {info['lora_alpha']}, scales {info['scales']}",
        f"LoRA params   {info['lora_params']:,}",
        f"extra tensors {len(info['extra_tensors'])} ({info['extra_params']:,} params, passed through)",
        "",
    ]
    rows = [[k["kind"], k["modules"], f"{k['d_out']}x{k['d_in']}", "/".join(map(str, k["ranks"])),
             f"{k['params']:,}", f"{k['stable_rank_mean']:.2f}", f"{k['dirs90_mean']:.1f}"]
            for k in info["kinds"]]
    out.append(table(rows, ["kind", "n", "shape", "r", "params", "stable rank", "dirs 90%"]))
    out.append("")
    rows = [[f"{t['ratio']}", f"{t['budget']:,}", f"{t['relative_error']:.4f}"]
            for t in info["truncation"]]
    out.append("global SVD truncation at a parameter budget of lora_params / ratio:")
    out.append(table(rows, ["ratio", "budget", "relative error"]))
    return "\n".join(out)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema instead of tables.")
@handle_errors
def inspect(path: str, as_json: bool) -> None:
    """Show what an adapter holds: format, modules, kinds, spectra, truncation errors.

    PATH is a PEFT folder, an adapter_model.* file inside one, or a diffusers/kohya
    .safetensors file.
    """
    from .inspect import inspect_lora
    from .readers import read_adapter

    info = inspect_lora(read_adapter(path))
    click.echo(json.dumps(info, indent=2) if as_json else render_lora_inspect(info))


if __name__ == "__main__":  # pragma: no cover
    main()
