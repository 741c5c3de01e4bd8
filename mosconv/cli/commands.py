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

from .. import __version__
from ..errors import ConfigError, MosconvError

log = logging.getLogger("mosconv")


class _EchoHandler(logging.Handler):
    """mosconv's log records on the current stderr (click's, so tests capture them too)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"mosconv: {record.getMessage()}", err=True)


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
        except (click.ClickException, click.exceptions.Exit):
            raise  # usage errors: click prints them and exits 2
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
      mosconv export OUT LORA_OUT           back to a plain PEFT LoRA for servers
      mosconv batch ZOO_DIR OUT_DIR         a whole zoo, resumable
      mosconv calibrate / compress --calib / --distill / eval   with a local base model
    Shell completion: eval "$(_MOSCONV_COMPLETE=bash_source mosconv)" (see docs/cli.md).
    """
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
        log.propagate = False
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)  # only mosconv's own logs


def render_lora_inspect(info: dict) -> str:
    lora = info["lora_params"]
    stored = info.get("stored_params", lora)  # LyCORIS: the file's own count differs
    params = (f"LoRA params   {lora:,}" if stored == lora else
              f"params        {stored:,} stored in the file; LoRA-equivalent {lora:,} (the "
              "exact factorization, the reference for --ratio)")
    out = [
        f"format        {info['format']}  (dtype {info['dtype']}"
        + (", fan_in_fan_out" if info["fan_in_fan_out"] else "") + ")",
        f"base model    {info['base_model'] or '-'}   task {info['task_type'] or '-'}",
        "files         " + ", ".join(f"{f['path']} ({_fmt_bytes(f['bytes'])})" for f in info["files"]),
        (f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ranks "
         f"{info['ranks']}, alpha {info['lora_alpha']}, scales {info['scales']}"),
        params,
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
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Also draw a PNG: spectra and truncation errors of a LoRA, or per-module "
                   "errors of a MoS folder's report.json (pip install 'mosconv[plot]').")
@handle_errors
def inspect(path: str, as_json: bool, plot_path: str | None) -> None:
    """Show what an adapter holds: format, modules, kinds, spectra, truncation errors.

    PATH is a PEFT folder, an adapter_model.* file inside one, or a diffusers, kohya or
    LyCORIS (LoHa/LoKr) .safetensors file.
    """
    from ..inspect import inspect_lora, inspect_mos
    from ..lora.read import read_adapter
    from ..mos.format import is_mos_dir

    if plot_path is not None:
        from .plot import check_plot_path

        check_plot_path(plot_path)
    if is_mos_dir(path):
        info = inspect_mos(path)
        if plot_path is not None and not info.get("report"):
            raise ConfigError(f"{path}: no report.json, nothing to plot")
        click.echo(json.dumps(info, indent=2) if as_json else render_mos_inspect(info))
        if plot_path is not None:
            from .plot import plot_mos

            plot_mos(info["report"], plot_path)
            if not as_json:
                click.echo(f"wrote {plot_path}")
        return
    adapter = read_adapter(path)
    info = inspect_lora(adapter)
    click.echo(json.dumps(info, indent=2) if as_json else render_lora_inspect(info))
    if plot_path is not None:
        from .plot import lora_spectra, plot_lora

        plot_lora(info, plot_path, spectra=lora_spectra(adapter))
        if not as_json:
            click.echo(f"wrote {plot_path}")


def render_report(report: dict) -> str:
    """The short table printed after a conversion (and by inspect on a MoS folder)."""
    t = report["totals"]
    data = t.get("metric") == "data"
    headers = ["kind", "structure", "nc", "pool A/B", "params", "rel.err", "trunc.err"]
    if data:
        headers += ["data err", "data trunc"]
    rows = []
    for k in report["kinds"]:
        rows.append([k["kind"], k["structure"], k["nc"], f"{k['pool_A']}/{k['pool_B']}",
                     f"{k['params']:,}", f"{k['relative_error']:.4f}",
                     f"{k['truncation_relative_error']:.4f}"])
        if data:
            rows[-1] += [f"{k['data_relative_error']:.4f}", f"{k['data_truncation_relative_error']:.4f}"]
    out = [table(rows, headers), ""]
    fb = t.get("file_bytes_ratio")
    out.append(
        f"params {t['lora_params']:,} -> {t['mos_params']:,} (x{t['param_ratio'] or 0:.2f}, budget "
        f"{t['budget']:,}); index {_fmt_bytes(t['index_bytes'])}"
        + (f"; the {t['source_format']} file stores {t['source_params']:,}"
           if t.get("source_params", t["lora_params"]) != t["lora_params"] else "")
        + (f"; own {t['local_params']:,} + shared pool" if t.get("local_params") is not None
           and t["local_params"] != t["mos_params"] else "")
        + (f"; file x{fb:.2f} smaller" if fb else "")
    )
    if t.get("source_params") is not None and t["mos_params"] > t["source_params"]:
        out.append(f"note: the MoS adapter holds more parameters than the {t['source_format']} "
                   f"file ({t['source_params']:,}): its Hadamard/Kronecker structure stores less "
                   "than a LoRA of the update's rank; a larger --ratio gives a smaller file")
    gain = (f"   (sharing gain {t['sharing_gain']:+.4f}, {t['kinds_shared']} of "
            f"{len(report['kinds'])} kinds shared)")
    out.append(
        f"relative error {t['relative_error']:.4f}   truncation at the same budget "
        f"{t['truncation_relative_error']:.4f}" + ("" if data else gain)
    )
    if data:  # the conversion minimized this metric; its baseline is data-aware truncation
        out.append(
            f"data-aware error {t['data_relative_error']:.4f}   data-aware truncation "
            f"{t['data_truncation_relative_error']:.4f}   plain truncation "
            f"{t['plain_truncation_data_relative_error']:.4f}   ({t['calib_tokens']:,} tokens)"
            + gain)
    d = report.get("distill")
    if d:
        out.append(
            f"held-out KL(teacher||student) {d['kl_before']:.5f} -> {d['kl_after']:.5f} after "
            f"{d['steps']} steps ({d['device']}, {d['steps_per_s']:.2f} steps/s); truncation at "
            f"the same budget {d['truncation_kl']:.5f}")
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


def _convert_options(fn):
    """The conversion settings, shared by compress and batch (ConvertConfig's fields)."""
    opts = [
        click.option("--ratio", type=float, default=8.0, show_default=True,
                     help="Parameter budget: MoS params <= LoRA params / RATIO (any value >= 1; "
                          "1 is lossless). batch --shared-pool: per group of adapters."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for clustering (deterministic output)."),
        click.option("--search", type=click.Choice(["truncation", "fast", "thorough"]),
                     default="fast", show_default=True,
                     help="truncation: all-private only; fast/thorough: also try shared pools."),
        click.option("--iters", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Refinement iterations per MoS candidate."),
        click.option("--routing-weights/--no-routing-weights", default=True, show_default=True,
                     help="Allow per-slot scalar weights (counted as parameters); off = the "
                          "paper's plain form."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _data_options(fn):
    """Options shared by calibrate, compress and eval: base model, text, device."""
    opts = [
        click.option("--base-model", default=None, metavar="PATH",
                     help="Local transformers model folder, or a folder holding --gguf-file (never downloaded)."),
        click.option("--gguf-file", default=None, metavar="NAME", help="GGUF file inside --base-model."),
        click.option("--data", default=None, metavar="FILE",
                     help="Text: plain text (blank lines separate documents) or JSONL with 'text'."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=50_000, show_default=True,
                     help="Tokens of --data used at most."),
        click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per block."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Blocks per forward pass / optimizer step."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when available), cpu or cuda."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("lora", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@_convert_options
@click.option("--calib", default=None, metavar="STATS_OR_DATA",
              help="Data-aware conversion: a calibration file (mosconv calibrate) or a text/JSONL "
                   "file to run --base-model on (stats saved as OUT/calib_stats.safetensors).")
@click.option("--distill", is_flag=True,
              help="Fine-tune the converted adapter against the LoRA (KL of next-token "
                   "distributions) on --data with --base-model.")
@_data_options
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
              help="Distillation steps at most (early stopping on the held-out split).")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Distillation peak learning rate.")
@click.option("--held-out", type=float, default=0.1, show_default=True,
              help="Share of the data blocks held out for early stopping and the KL figures.")
@click.option("--hidden-weight", type=float, default=0.0, show_default=True,
              help="Weight of hidden-state matching added to the KL loss (0 = KL only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Also draw the report as a PNG: per-module errors, MoS next to truncation "
                   "(pip install 'mosconv[plot]').")
@handle_errors
def compress(lora, out, ratio, seed, search, iters, routing_weights, calib, distill, base_model,
             gguf_file, data, max_tokens, seq_len, batch_size, device, steps, lr, held_out,
             hidden_weight, overwrite, quiet, as_json, plot_path):
    """Convert the LoRA adapter LORA into a MoS adapter folder OUT.

    Writes OUT/mos_adapter.safetensors, OUT/report.json and OUT/mos_config.json (last).
    The report gives the relative error next to global SVD truncation at the same
    parameter budget; the converter never does worse than that baseline.

    \b
    With --calib the error that is minimized is ||(dW - dW') X|| on the inputs X the
    base model feeds each module; the baseline is then data-aware truncation, and both
    metrics are reported. With --distill the adapter is then fine-tuned end to end:
      mosconv compress LORA OUT --ratio 8 --distill --base-model MODEL_DIR \\
          --gguf-file model.gguf --data text.txt --steps 100 --device auto
    """
    from tqdm import tqdm

    from ..errors import FormatError
    from ..fit.convert import ConvertConfig
    from ..lora.read import read_adapter  # noqa: F401  (import errors surface early)
    from ..model.distill import DistillConfig
    from ..mos.format import is_mos_dir
    from ..pipeline import DataSpec
    from ..pipeline import compress as run_compress

    if is_mos_dir(lora):
        raise FormatError(f"{lora}: is a MoS adapter, not a LoRA (compress converts LoRAs; "
                          "`mosconv export` turns a MoS adapter back into a LoRA)")
    config = ConvertConfig(ratio=ratio, seed=seed, search=search, iters=iters,
                           routing_weights=routing_weights)
    config.validate()
    if plot_path is not None:  # before the work: a missing matplotlib fails at once
        from .plot import check_plot_path

        check_plot_path(plot_path)
    spec = DataSpec(base_model=base_model, gguf_file=gguf_file, data=data,
                    max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, device=device)
    dconfig = None
    if distill:
        dconfig = DistillConfig(steps=steps, lr=lr, batch_size=batch_size, device=device,
                                hidden_weight=hidden_weight, seed=seed)
        dconfig.validate()
    elif data is not None and calib is None:
        raise click.UsageError("--data is used with --distill or --calib")
    bars = []
    step_bar = []

    def on_step(step: int, loss: float) -> None:
        if quiet:
            return
        if not step_bar:
            step_bar.append(tqdm(desc="distilling", total=steps, unit="step", file=sys.stderr,
                                 leave=False, disable=None))
        step_bar[0].update(1)
        step_bar[0].set_postfix_str(f"loss {loss:.4f}")

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
                              progress=progress, calib=calib, data=spec, distill=dconfig,
                              held_out=held_out, on_step=on_step)
    finally:
        for bar in bars + step_bar:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    elif not quiet:
        click.echo(render_report(result.report))
        click.echo(f"wrote {out}")
    if plot_path is not None:
        from ..mos.format import load_report
        from .plot import plot_mos

        plot_mos(load_report(out) or result.report, plot_path)
        if not quiet and not as_json:
            click.echo(f"wrote {plot_path}")


@main.command()
@click.argument("lora", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@_data_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@handle_errors
def calibrate(lora, out, base_model, gguf_file, data, max_tokens, seq_len, batch_size, device,
              quiet, as_json):
    """Collect the input second moment of every module LORA adapts, running --base-model on
    --data, into the file OUT (.safetensors), for `compress --calib OUT` (no model needed then).
    """
    import resource

    from tqdm import tqdm

    from ..pipeline import DataSpec
    from ..pipeline import calibrate as run_calibrate

    if not out.endswith(".safetensors"):
        raise click.UsageError(f"OUT must end in .safetensors, got {out!r}")
    spec = DataSpec(base_model=base_model, gguf_file=gguf_file, data=data, max_tokens=max_tokens,
                    seq_len=seq_len, batch_size=batch_size, device=device)
    bar = None if quiet else tqdm(desc="calibrating", unit="tok", unit_scale=True,
                                  file=sys.stderr, leave=False, disable=None)
    try:
        stats = run_calibrate(lora, spec, out, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = {"out": out, "modules": len(stats.moments), "tokens": stats.tokens,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **stats.info}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        click.echo(f"wrote {out}: {summary['modules']} modules, {stats.tokens:,} tokens, "
                   f"peak RSS {summary['peak_rss_mib']:.0f} MiB")


@main.command(name="eval")
@click.option("--teacher", required=True, metavar="LORA", help="The original LoRA adapter.")
@click.option("--student", required=True, metavar="MOS_OR_LORA",
              help="A MoS folder or a LoRA (e.g. an export or a truncation) to compare.")
@_data_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@handle_errors
def eval_cmd(teacher, student, base_model, gguf_file, data, max_tokens, seq_len, batch_size,
             device, as_json):
    """Fidelity of STUDENT to TEACHER on --data: mean per-token KL(teacher||student),
    perplexities of base / teacher / student and
    effect_retained = 1 - KL(teacher||student) / KL(teacher||base).
    """
    from ..pipeline import DataSpec, evaluate_adapters

    spec = DataSpec(base_model=base_model, gguf_file=gguf_file, data=data, max_tokens=max_tokens,
                    seq_len=seq_len, batch_size=batch_size, device=device)
    res = evaluate_adapters(teacher, student, spec)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    rows = [["base", f"{res['ppl_base']:.3f}", f"{res['kl_teacher_base']:.5f}", "0"],
            ["teacher", f"{res['ppl_teacher']:.3f}", "0", "1"],
            ["student", f"{res['ppl_student']:.3f}", f"{res['kl_teacher_student']:.5f}",
             f"{res['effect_retained']:.4f}" if res["effect_retained"] is not None else "-"]]
    click.echo(table(rows, ["model", "perplexity", "KL(teacher||.)", "effect retained"]))
    click.echo(f"{res['tokens']:,} tokens of {data}")


@main.command()
@click.argument("mos_dir", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary of what was written.")
@handle_errors
def export(mos_dir, out, overwrite, quiet, as_json):
    """Materialize the MoS adapter MOS_DIR as a plain PEFT LoRA folder OUT.

    Scale is folded into B and lora_alpha == r (per-module ranks in rank_pattern /
    alpha_pattern), as vLLM and LoRAX expect; non-LoRA tensors are restored.
    """
    from ..pipeline import export_lora

    folder = export_lora(mos_dir, out, overwrite=overwrite)
    if as_json:
        from ..names import PEFT_CONFIG

        cfg = json.loads((folder / PEFT_CONFIG).read_text())
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        click.echo(json.dumps({"out": str(folder), "files": files, "r": cfg["r"],
                               "lora_alpha": cfg["lora_alpha"],
                               "rank_pattern": cfg.get("rank_pattern", {})}, indent=2))
    elif not quiet:
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
@_convert_options
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
def batch(zoo, out, ratio, seed, search, iters, routing_weights, jobs, engine, address,
          shared_pool, overwrite, quiet, as_json):
    """Convert every adapter under ZOO (a folder searched recursively, or a text file listing
    adapter paths) into OUT, mirroring the layout.

    Finished adapters (mos_config.json present, source sha256 unchanged) are skipped, so an
    interrupted run can simply be rerun.  A broken adapter does not stop the others; the exit
    code is 1 if any failed.  OUT/summary.json lists every adapter and the zoo totals.
    """
    from dataclasses import asdict

    from tqdm import tqdm

    from ..batch.run import BatchConfig, run_batch

    config = BatchConfig(ratio=ratio, seed=seed, search=search, iters=iters,
                         routing_weights=routing_weights, jobs=jobs, engine=engine,
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
