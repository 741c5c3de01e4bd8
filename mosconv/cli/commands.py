"""The ``mosconv`` command line: each command parses, calls the library and renders.

No logic lives here: options and settings are in :mod:`.options`, text output in
:mod:`.render`.  Exit codes: 0 ok, 1 failure (bad input, failed conversion), 2 usage error.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..errors import ConfigError
from .options import (
    Bars,
    check_modes,
    convert_config,
    convert_options,
    data_options,
    data_spec,
    distill_config,
    distill_options,
    handle_errors,
    output_options,
)
from .render import (
    render_eval,
    render_lora_inspect,
    render_mos_inspect,
    render_report,
    render_summary,
)

log = logging.getLogger("mosconv")


class _EchoHandler(logging.Handler):
    """mosconv's log records on the current stderr (click's, so tests capture them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"mosconv: {record.getMessage()}", err=True)


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mosconv")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and tracebacks of internal errors).")
def main(verbose: bool) -> None:
    """Convert trained LoRA adapters into Mixture-of-Shards adapters (arXiv 2410.00938).

    \b
    Typical use:
      mosconv inspect LORA_DIR              what the adapter holds, truncation errors
      mosconv compress LORA_DIR OUT --ratio 8
      mosconv export OUT LORA_OUT           back to a plain PEFT LoRA for servers
      mosconv batch ZOO_DIR OUT_DIR         a whole zoo, resumable
      mosconv calibrate / compress --calib / --distill / eval   with a local base model
    Shell completion: eval "$(_MOSCONV_COMPLETE=bash_source mosconv)" (see docs/cli.md).
    """
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)  # only mosconv's own logs


def _plot(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--plot", "plot_path", default=None, metavar="FILE.png",
                        help=f"Also draw a PNG: {what} (pip install 'mosconv[plot]').")


def _check_plot(plot_path: str | None) -> None:
    """Before the work: a bad path (a usage error) or a missing matplotlib fails at once."""
    if plot_path is not None:
        from .plot import plot_path_problem, require_matplotlib

        problem = plot_path_problem(Path(plot_path))
        if problem:
            raise click.BadParameter(f"{plot_path}: {problem}", param_hint="'--plot'")
        require_matplotlib()


def _inspect_serving(path: str, as_json: bool, plot_path: str | None) -> None:
    from ..inspect import inspect_serving
    from .render import render_serving

    if plot_path is not None:
        raise click.UsageError("--serving does not draw a plot")
    info = inspect_serving(path)
    click.echo(json.dumps(info, indent=2) if as_json else render_serving(info))


def _not_an_adapter(path: Path) -> None:
    """Name what ``batch`` writes besides adapters when it is given to ``inspect``."""
    from ..batch.run import SUMMARY_FILE
    from ..names import POOLS_DIR

    if path.is_dir() and (path / SUMMARY_FILE).is_file():
        raise ConfigError(f"{path}: a batch output folder; `inspect --serving` shows what "
                          "serving it takes, `inspect` on one of its adapter folders that "
                          "adapter")
    if path.is_file() and path.parent.name == POOLS_DIR and \
            path.with_name(path.name.removesuffix(".safetensors") + ".members.json").is_file():
        raise ConfigError(f"{path}: a zoo group's shared pool file; `inspect` one of the "
                          "adapter folders that use it")


# Options that change what is printed or whether an old output may be replaced, not what is
# written: left out of the recorded command, so that they do not change the output's bytes.
SCREEN_ONLY = frozenset({"--overwrite", "--quiet", "-q", "--json", "-v", "--verbose"})
PICTURE_ONLY = "--plot"  # its value names a picture written beside: no output byte changes


def recorded_command(argv: list[str]) -> str:
    """The command line recorded in an output: ``argv`` without the options that change
    only what is printed or drawn, or whether an old output may be replaced."""
    kept, skip = [], False
    for a in argv:
        if skip or a in SCREEN_ONLY or a.startswith(PICTURE_ONLY + "="):
            skip = False
            continue
        skip = a == PICTURE_ONLY
        if not skip:
            kept.append(a)
    return "mosconv " + " ".join(kept)


@main.command()
@click.argument("path", type=click.Path(path_type=str, readable=False))
@click.option("--json", "as_json", is_flag=True, help="Print the documented JSON schema instead of tables.")
@click.option("--serving", is_flag=True,
              help="For a batch output (or a MoS folder): the memory serving it takes, shared "
                   "pools once and each adapter's own part, next to the same adapters as "
                   "plain LoRAs (computed from the files).")
@_plot("spectra and truncation errors of a LoRA, or per-module errors of a MoS folder's report, MoS next to truncation")
@handle_errors
def inspect(path: str, as_json: bool, serving: bool, plot_path: str | None) -> None:
    """Show what an adapter holds: format, modules, kinds, spectra, truncation errors.

    PATH is a PEFT folder, an adapter_model.* file inside one, or a diffusers, kohya or
    LyCORIS (LoHa/LoKr) .safetensors file; a MoS folder; with --serving a batch output.
    """
    from ..inspect import inspect_lora, inspect_mos
    from ..lora.read import read_adapter
    from ..mos.format import is_mos_dir, load_report

    if serving:
        return _inspect_serving(path, as_json, plot_path)
    _check_plot(plot_path)
    mos = is_mos_dir(path)
    report = load_report(path) if mos and plot_path is not None else None
    if mos and plot_path is not None and report is None:
        raise ConfigError(f"{path}: no report.json, nothing to plot")
    if not mos:
        _not_an_adapter(Path(path))
    adapter = None if mos else read_adapter(path)
    info = inspect_mos(path) if mos else inspect_lora(adapter)
    if as_json:
        _dump(info)
    else:
        click.echo(render_mos_inspect(info) if mos else render_lora_inspect(info))
    if plot_path is not None:
        from .plot import lora_spectra, plot_lora, plot_mos

        if mos:
            plot_mos(report, plot_path)
        else:
            plot_lora(info, plot_path, spectra=lora_spectra(adapter))
        if not as_json:
            click.echo(f"wrote {plot_path}")


@main.command()
@click.argument("lora", type=click.Path(path_type=str, readable=False))
@click.argument("out", type=click.Path(path_type=str, readable=False))
@convert_options
@click.option("--calib", default=None, metavar="STATS_OR_DATA",
              help="Data-aware conversion: a calibration file (mosconv calibrate) or a text/JSONL "
                   "file to run --base-model on (stats saved as OUT/calib_stats.safetensors).")
@click.option("--distill", is_flag=True,
              help="Fine-tune the converted adapter against the LoRA (KL of next-token "
                   "distributions) on --data with --base-model.")
@data_options
@distill_options
@output_options("the report (report.json)")
@_plot("the per-module errors of the report, MoS next to truncation")
@handle_errors
def compress(lora: str, out: str, calib: str | None, distill: bool, overwrite: bool,
             quiet: bool, as_json: bool, plot_path: str | None, **opts: Any) -> None:
    """Convert the LoRA adapter LORA into a MoS adapter folder OUT.

    Writes OUT/mos_adapter.safetensors, OUT/report.json and OUT/mos_config.json (last);
    with --calib TEXT also OUT/calib_stats.safetensors (the statistics, for reuse; not
    part of the adapter).
    The report gives the relative error next to global SVD truncation at the same
    parameter budget (in float32) and truncation stored alike (--dtype, --quantize) in no
    more bytes; the converter never does worse than these baselines in float32, nor than
    the second in any storage.

    \b
    With --calib the error that is minimized is ||(dW - dW') X|| on the inputs X the
    base model feeds each module; the baseline is then data-aware truncation, and both
    metrics are reported. With --distill the adapter is then fine-tuned end to end:
      mosconv compress LORA OUT --ratio 8 --distill --base-model MODEL_DIR \\
          --gguf-file model.gguf --data text.txt --steps 100 --device auto
    """
    from ..pipeline import compress as run_compress

    config, spec = convert_config(opts), data_spec(opts)
    _check_plot(plot_path)
    dconfig = distill_config(opts) if distill else None
    check_modes(distill, calib is not None, opts)
    command = recorded_command(sys.argv[1:]) if sys.argv else None
    what = ("trying storages", "storage") if opts["size_ratio"] else ("fitting kinds", "kind")
    with Bars(quiet) as bars:
        result = run_compress(
            lora, out, config, command=command, overwrite=overwrite, calib=calib, data=spec,
            distill=dconfig, held_out=opts["held_out"], progress_total=bars.sizer(*what),
            progress=bars.counter(*what, label=lambda k: k[-40:]),
            on_step=bars.counter("distilling", "step", opts["steps"], lambda s, l: f"loss {l:.4f}"))
    if as_json:
        _dump(result.report.to_json())
    elif not quiet:
        click.echo(render_report(result.report) + f"\nwrote {out}")
    totals = result.report.totals
    if totals.mos_params == 0 and totals.relative_error > 0.5:  # a source with an update
        click.echo(f"mosconv: warning: a budget of {totals.budget:,} parameters holds nothing: "
                   f"{out} is an all-zero adapter (error 1.0); lower the ratio", err=True)
    if plot_path is not None:
        from .plot import plot_mos

        plot_mos(result.report, plot_path)
        if not quiet and not as_json:
            click.echo(f"wrote {plot_path}")


@main.command()
@click.argument("lora", type=click.Path(path_type=str, readable=False))
@click.argument("out", type=click.Path(path_type=str, readable=False))
@data_options
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handle_errors
def calibrate(lora: str, out: str, overwrite: bool, quiet: bool, as_json: bool,
              **opts: Any) -> None:
    """Collect the input second moment of every module LORA adapts, running --base-model on
    --data, into the file OUT (.safetensors), for `compress --calib OUT` (no model needed then).
    """
    import resource

    from ..pipeline import calibrate as run_calibrate

    if not out.endswith(".safetensors"):
        raise click.UsageError(f"OUT must end in .safetensors, got {out!r}")
    with Bars(quiet) as bars:
        tick = None if quiet else (lambda n: bars.bar("calibrating", unit="tok",
                                                      unit_scale=True).update(n))
        stats = run_calibrate(lora, data_spec(opts, "calibrate"), out, progress=tick,
                              overwrite=overwrite)
    summary = {"out": out, "modules": len(stats.moments), "tokens": stats.tokens,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **stats.info}
    if as_json:
        _dump(summary)
    elif not quiet:
        click.echo(f"wrote {out}: {summary['modules']} modules, {stats.tokens:,} tokens, "
                   f"peak RSS {summary['peak_rss_mib']:.0f} MiB")


@main.command(name="eval")
@click.option("--teacher", required=True, metavar="LORA",
              help="The reference: the original LoRA adapter (a MoS folder is read too).")
@click.option("--student", required=True, metavar="MOS_OR_LORA",
              help="A MoS folder or a LoRA (e.g. an export or a truncation) to compare.")
@data_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@handle_errors
def eval_cmd(teacher: str, student: str, as_json: bool, **opts: Any) -> None:
    """Fidelity of STUDENT to TEACHER on --data: mean per-token KL(teacher||student),
    perplexities of base / teacher / student and
    effect_retained = 1 - KL(teacher||student) / KL(teacher||base).
    """
    from ..pipeline import evaluate_adapters

    res = evaluate_adapters(teacher, student, data_spec(opts, "eval"))
    if as_json:
        _dump(res)
    else:
        click.echo(render_eval(res, opts["data"]))


@main.command()
@click.argument("mos_dir", type=click.Path(path_type=str, readable=False))
@click.argument("out", type=click.Path(path_type=str, readable=False))
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="dtype of the LoRA factors; auto = the MoS adapter's float dtype (float32 "
                   "for int8/int4 adapters: their dequantized values are exact in it). A zoo "
                   "member's core is folded into B, which float16/bfloat16 round; float32 "
                   "keeps the update exact.")
@click.option("--pad-rank", default=None, metavar="R|auto",
              help="Pad every module with zeros to one rank R (auto: the smallest of 8, 16, "
                   "32, ..., 512 that holds them all), for servers that read only the "
                   "top-level r (vLLM, LoRAX max_lora_rank).")
@output_options("a JSON summary of what was written", shown="the 'wrote OUT' line")
@handle_errors
def export(mos_dir: str, out: str, dtype: str, pad_rank: str | None, overwrite: bool,
           quiet: bool, as_json: bool) -> None:
    """Materialize the MoS adapter MOS_DIR as a plain PEFT LoRA folder OUT.

    Scale is folded into B and lora_alpha == r (per-module ranks in rank_pattern /
    alpha_pattern), as vLLM and LoRAX expect; non-LoRA tensors are restored.
    """
    from ..pipeline import export_lora, export_summary

    if pad_rank is not None and pad_rank != "auto":
        if not pad_rank.isdigit() or int(pad_rank) < 1:
            raise click.BadParameter(f"{pad_rank!r} is not auto or an integer >= 1",
                                     param_hint="--pad-rank")
        pad_rank = int(pad_rank)  # type: ignore[assignment]
    folder = export_lora(mos_dir, out, overwrite=overwrite, dtype=dtype, pad_rank=pad_rank)
    if as_json:
        _dump(export_summary(folder))
    elif not quiet:
        click.echo(f"wrote {out}")


@main.command()
@click.argument("zoo", type=click.Path(path_type=str, readable=False))
@click.argument("out", type=click.Path(path_type=str, readable=False))
@convert_options
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Adapters converted in parallel (processes; torch threads divided among them).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local processes, or tasks on a Ray cluster (pip install 'mosconv[ray]').")
@click.option("--address", default=None, help="Ray cluster address (auto or HOST:PORT); default starts a local one.")
@click.option("--shared-pool", is_flag=True,
              help="Fit each group of adapters with the same base model and kinds jointly: "
                   "bases stored once (OUT/pools), a small core per adapter.")
@click.option("--refit", is_flag=True,
              help="With --shared-pool: refit a group whose members changed (it gained "
                   "adapters, now or since its pools were fitted, or some left the zoo; "
                   "rewrites its members); default: fit only new ones against the group's "
                   "pools.")
@output_options("summary.json", "Redo adapters whose output is already complete.")
@handle_errors
def batch(zoo: str, out: str, quiet: bool, as_json: bool, **opts: Any) -> None:
    """Convert every adapter under ZOO (a folder searched recursively, or a text file listing
    adapter paths) into OUT, mirroring the layout.

    Finished adapters (mos_config.json present; source sha256 and settings unchanged) are
    skipped, so an interrupted run can simply be rerun.  A broken adapter does not stop the
    others; the exit code is 1 if any failed.  OUT/summary.json lists every adapter and the
    zoo totals.
    """
    from dataclasses import asdict

    from ..batch.run import SUMMARY_FILE, BatchConfig, run_batch
    from .options import resolve_budget

    if opts["refit"] and not opts["shared_pool"]:
        raise click.UsageError("--refit is used with --shared-pool")
    if opts["address"] is not None and opts["engine"] != "ray":
        raise click.UsageError("--address is used with --engine ray")
    config = BatchConfig(**resolve_budget(opts))
    with Bars(quiet) as bars:
        summary = run_batch(zoo, out, config, bars.counter(
            "adapters", "adapter", label=lambda o: f"{o.status} {o.name[-40:]}"))
    if as_json:
        _dump(asdict(summary))
    elif not quiet:
        click.echo(render_summary(summary) + f"\nwrote {Path(out) / SUMMARY_FILE}")
    for a in summary.adapters:
        if a.status == "failed":
            click.echo(f"mosconv: error: {a.error}", err=True)
    if summary.failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
