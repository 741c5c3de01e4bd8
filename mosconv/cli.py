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
        except Exception as e:  # noqa: BLE001  (a bug: one line; -v shows the traceback)
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
        "files         " + ", ".join(f"{f['path']} ({_fmt_bytes(f['bytes'])})" for f in info["files"]),
        (f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ranks "
         f"{info['ranks']}, alpha {info['lora_alpha']}, scales {info['scales']}"),
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
    from .inspect import inspect_lora, inspect_mos
    from .mos_format import is_mos_dir
    from .readers import read_adapter

    if is_mos_dir(path):
        info = inspect_mos(path)
        click.echo(json.dumps(info, indent=2) if as_json else render_mos_inspect(info))
        return
    info = inspect_lora(read_adapter(path))
    click.echo(json.dumps(info, indent=2) if as_json else render_lora_inspect(info))


def render_report(report: dict) -> str:
    """The short table printed after a conversion (and by inspect on a MoS folder)."""
    t = report["totals"]
    rows = [[k["kind"], k["structure"], k["nc"], f"{k['pool_A']}/{k['pool_B']}",
             f"{k['params']:,}", f"{k['relative_error']:.4f}", f"{k['truncation_relative_error']:.4f}"]
            for k in report["kinds"]]
    out = [table(rows, ["kind", "structure", "nc", "pool A/B", "params", "rel.err", "trunc.err"]), ""]
    fb = t.get("file_bytes_ratio")
    out.append(
        f"params {t['lora_params']:,} -> {t['mos_params']:,} (x{t['param_ratio'] or 0:.2f}, budget "
        f"{t['budget']:,}); index {_fmt_bytes(t['index_bytes'])}"
        + (f"; own {t['local_params']:,} + shared pool" if t.get("local_params") is not None
           and t["local_params"] != t["mos_params"] else "")
        + (f"; file x{fb:.2f} smaller" if fb else "")
    )
    out.append(
        f"relative error {t['relative_error']:.4f}   truncation at the same budget "
        f"{t['truncation_relative_error']:.4f}   (sharing gain {t['sharing_gain']:+.4f}, "
        f"{t['kinds_shared']} of {len(report['kinds'])} kinds shared)"
    )
    return "\n".join(out)


def render_mos_inspect(info: dict) -> str:
    out = [
        f"MoS adapter   format v{info['format_version']}, mosconv {info.get('mosconv_version')}",
        f"source        {info['source_format']} ({info.get('base_model') or '-'})",
        f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ratio {info.get('ratio')}",
        f"params        {info['params']:,}  index {_fmt_bytes(info['index_bytes'])}",
        f"command       {info.get('command') or '-'}",
        "",
    ]
    if info.get("report"):
        out.append(render_report(info["report"]))
    else:
        rows = [[k["kind"], k["nc"], k["pool_A"], k["pool_B"], k["public_A"], k["public_B"]]
                for k in info["kinds"]]
        out.append(table(rows, ["kind", "nc", "pool A", "pool B", "public A", "public B"]))
    return "\n".join(out)


@main.command()
@click.argument("lora", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--ratio", type=float, default=8.0, show_default=True,
              help="Parameter budget: MoS params <= LoRA params / RATIO (any value >= 1; 1 is lossless).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for clustering (deterministic output).")
@click.option("--search", type=click.Choice(["truncation", "fast", "thorough"]), default="fast",
              show_default=True, help="truncation: all-private only; fast/thorough: also try shared pools.")
@click.option("--iters", type=click.IntRange(min=0), default=4, show_default=True,
              help="Refinement iterations per MoS candidate.")
@click.option("--routing-weights/--no-routing-weights", default=True, show_default=True,
              help="Allow per-slot scalar weights (counted as parameters); off = the paper's plain form.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@handle_errors
def compress(lora, out, ratio, seed, search, iters, routing_weights, overwrite, quiet, as_json):
    """Convert the LoRA adapter LORA into a MoS adapter folder OUT.

    Writes OUT/mos_adapter.safetensors, OUT/report.json and OUT/mos_config.json (last).
    The report gives the relative error next to global SVD truncation at the same
    parameter budget; the converter never does worse than that baseline.
    """
    from tqdm import tqdm

    from .convert import ConvertConfig
    from .pipeline import compress as run_compress
    from .readers import read_adapter  # noqa: F401  (import errors surface early)

    config = ConvertConfig(ratio=ratio, seed=seed, search=search, iters=iters,
                           routing_weights=routing_weights)
    config.validate()
    bars = []

    def progress(kind: str) -> None:  # the bar appears once fitting starts (terminals only)
        if quiet:
            return
        if not bars:
            bars.append(tqdm(desc="fitting kinds", unit="kind", file=sys.stderr, leave=False,
                             disable=None))
        bars[0].update(1)
        bars[0].set_postfix_str(kind[-40:])

    command = "mosconv " + " ".join(sys.argv[1:]) if sys.argv else None
    try:
        result = run_compress(lora, out, config, command=command, overwrite=overwrite,
                              progress=progress)
    finally:
        for bar in bars:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    elif not quiet:
        click.echo(render_report(result.report))
        click.echo(f"wrote {out}")


@main.command()
@click.argument("mos_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@handle_errors
def export(mos_dir, out, overwrite):
    """Materialize the MoS adapter MOS_DIR as a plain PEFT LoRA folder OUT.

    Scale is folded into B and lora_alpha == r (per-module ranks in rank_pattern /
    alpha_pattern), as vLLM and LoRAX expect; non-LoRA tensors are restored.
    """
    from .pipeline import export_lora

    export_lora(mos_dir, out, overwrite=overwrite)
    click.echo(f"wrote {out}")


def render_summary(summary) -> str:
    rows = []
    for a in summary.adapters:
        err = f"{a['relative_error']:.4f}" if a["relative_error"] is not None else "-"
        trunc = f"{a['truncation_relative_error']:.4f}" if a["truncation_relative_error"] is not None else "-"
        params = (f"{a['lora_params']:,} -> {a['local_params']:,}" if a["lora_params"] is not None
                  else "-")
        rows.append([a["name"], a["status"], params, err, trunc, f"{a['seconds']:.1f}",
                     (a["error"] or "")[:80]])
    out = [table(rows, ["adapter", "status", "params (own)", "rel.err", "trunc.err", "s", "error"])]
    t = summary.totals
    out.append("")
    line = (f"{t['adapters']} adapters: {t['converted']} converted, {t['skipped']} skipped, "
            f"{t['failed']} failed; params {t['lora_params']:,} -> {t['mos_params']:,}")
    if t["shared_pool_params"]:
        line += f" (incl. {t['shared_pool_params']:,} in shared pools)"
    out.append(line)
    if t.get("relative_error") is not None:
        out.append(f"zoo relative error {t['relative_error']:.4f}   truncation "
                   f"{t['truncation_relative_error']:.4f} (energy-weighted over adapters)")
    return "\n".join(out)


@main.command()
@click.argument("zoo", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--ratio", type=float, default=8.0, show_default=True,
              help="Budget: MoS params <= LoRA params / RATIO (per adapter, or per group with --shared-pool).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--search", type=click.Choice(["truncation", "fast", "thorough"]), default="fast",
              show_default=True, help="As in compress (independent mode).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Adapters converted in parallel (processes; torch threads divided among them).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local processes, or tasks on a Ray cluster (pip install 'mosconv[ray]').")
@click.option("--address", default=None, help="Ray cluster address (auto or HOST:PORT); default starts a local one.")
@click.option("--shared-pool", is_flag=True,
              help="One set of pools per group of adapters with the same base model and kinds.")
@click.option("--overwrite", is_flag=True, help="Redo adapters whose output is already complete.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json instead of the table.")
@handle_errors
def batch(zoo, out, ratio, seed, search, jobs, engine, address, shared_pool, overwrite, quiet,
          as_json):
    """Convert every adapter under ZOO (a folder searched recursively, or a text file listing
    adapter paths) into OUT, mirroring the layout.

    Finished adapters (mos_config.json present, source sha256 unchanged) are skipped, so an
    interrupted run can simply be rerun.  A broken adapter does not stop the others; the exit
    code is 1 if any failed.  OUT/summary.json lists every adapter and the zoo totals.
    """
    from dataclasses import asdict

    from tqdm import tqdm

    from .batch import BatchConfig, run_batch

    config = BatchConfig(ratio=ratio, seed=seed, search=search, jobs=jobs, engine=engine,
                         address=address, shared_pool=shared_pool, overwrite=overwrite)
    bar = None if quiet else tqdm(desc="adapters", unit="adapter", file=sys.stderr,
                                  leave=False, disable=None)

    def progress(outcome) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{outcome.status} {outcome.name[-40:]}")

    try:
        summary = run_batch(zoo, out, config, progress)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    elif not quiet:
        click.echo(render_summary(summary))
    for a in summary.adapters:
        if a["status"] == "failed":
            click.echo(f"mosconv: error: {a['error']}", err=True)
    if summary.failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
