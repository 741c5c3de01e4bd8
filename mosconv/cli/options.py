"""What the commands share: option declarations (each declared once), the settings objects
built from them, error handling (one line, exit 1) and progress bars."""

from __future__ import annotations

import functools
import logging
import math
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..errors import MosconvError

if TYPE_CHECKING:
    from ..fit.convert import ConvertConfig
    from ..model.distill import DistillConfig
    from ..pipeline import DataSpec

log = logging.getLogger("mosconv")
DEVICES = ("auto", "cpu", "cuda")  # model.distill.DEVICES, without importing torch here
F = TypeVar("F", bound=Callable[..., Any])


def flag(param: str) -> str:
    """The command-line option of a library parameter (``base_model`` -> ``--base-model``)."""
    return "--" + param.replace("_", "-")


def fail(message: str) -> None:
    click.echo(f"mosconv: error: {message}", err=True)
    sys.exit(1)


def handle_errors(fn: F) -> F:
    """Turn library errors into a one-line message and exit code 1, never a traceback.
    Errors that name library parameters (``MosconvError.options``) get the options to use."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MosconvError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if e.options:
                msg += f" (use {', '.join(flag(o) for o in e.options)})"
            fail(msg)
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            fail("interrupted")
        except (click.ClickException, click.exceptions.Exit):
            raise  # usage errors: click prints them and exits 2
        except Exception as e:  # noqa: BLE001  (a bug: one line; -v shows the traceback)
            msg = f"internal error: {type(e).__name__}: {str(e)[:300]}"
            if log.isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            else:
                msg += " (rerun as mosconv -v COMMAND ... for the traceback)"
            fail(msg)

    return wrapper  # type: ignore[return-value]


def _apply(fn: F, opts: list[Callable[[F], F]]) -> F:
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


CONVERT_KEYS = ("ratio", "seed", "search", "iters", "routing_weights", "dtype", "quantize",
                "size_ratio")
DATA_KEYS = ("base_model", "gguf_file", "data", "max_tokens", "seq_len", "batch_size", "device")


def _ratio(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A budget ratio: a finite number >= 1 (else a usage error, exit 2)."""
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise click.BadParameter(f"must be a finite number >= 1, got {value:g}", ctx, param)
    return value


SEED = click.IntRange(0, 2**32 - 1)  # what scikit-learn's random_state takes


def convert_options(fn: F) -> F:
    """The conversion settings, shared by compress and batch (ConvertConfig's fields)."""
    return _apply(fn, [
        click.option("--ratio", type=float, default=None, callback=_ratio,
                     help="Parameter budget: MoS params <= LoRA params / RATIO (any value >= 1; "
                          "1 keeps every direction, lossless in float32; default 8). "
                          "batch --shared-pool: per group of adapters."),
        click.option("--size-ratio", type=float, default=None, metavar="S", callback=_ratio,
                     help="Byte budget instead of --ratio: MoS tensor bytes <= the LoRA's tensor "
                          "bytes / S; mosconv picks the parameter ratio and the storage "
                          "(--dtype/--quantize choices) with the lowest error and says which."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                     default="auto", show_default=True,
                     help="How pools, cores and slot weights are stored; auto keeps the "
                          "source's float dtype, or with --quantize int8/int4 takes float16 "
                          "(bfloat16 for a bfloat16 source) for what is not quantized (batch "
                          "--shared-pool: one per group, the widest of its members'; with "
                          "--size-ratio, a float32 source may also get float16)."),
        click.option("--quantize", type=click.Choice(["none", "int8", "int4", "auto"]),
                     default=None,
                     help="Store pools and cores as int8 or int4 (float16 scales per 64 values, "
                          "fitted by least squares). Default none; with --size-ratio auto "
                          "(try none, int8 and int4)."),
        click.option("--seed", type=SEED, default=0, show_default=True,
                     help="Seed for clustering (deterministic output)."),
        click.option("--search", type=click.Choice(["truncation", "fast", "thorough"]),
                     default="fast", show_default=True,
                     help="truncation: all-private only; fast/thorough: also try shared pools."),
        click.option("--iters", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Refinement iterations per MoS candidate."),
        click.option("--routing-weights/--no-routing-weights", default=True, show_default=True,
                     help="Allow per-slot scalar weights (counted as parameters); off = the "
                          "paper's plain form."),
    ])


def data_options(fn: F) -> F:
    """Options shared by calibrate, compress and eval: base model, text, device."""
    return _apply(fn, [
        click.option("--base-model", default=None, metavar="PATH",
                     help="Local transformers model folder, or a folder holding --gguf-file (never downloaded)."),
        click.option("--gguf-file", default=None, metavar="NAME", help="GGUF file inside --base-model."),
        click.option("--data", default=None, metavar="FILE",
                     help="Text: plain text (blank lines separate documents), or JSONL with a 'text' "
                          "string or chat 'messages' per line."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=50_000, show_default=True,
                     help="Tokens of --data used at most."),
        click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per block."),
        click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Blocks per forward pass (and per optimizer step of compress --distill)."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto (CUDA when available), cpu or cuda."),
    ])


def distill_options(fn: F) -> F:
    """compress --distill's settings (DistillConfig's fields)."""
    return _apply(fn, [
        click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True,
                     help="Distillation steps at most (early stopping on the held-out split)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
                     show_default=True,
                     help="Distillation peak learning rate."),
        click.option("--held-out", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=0.1, show_default=True,
                     help="Share of the data blocks held out for early stopping and the KL figures."),
        click.option("--hidden-weight", type=click.FloatRange(min=0), default=0.0,
                     show_default=True,
                     help="Weight of hidden-state matching added to the KL loss (0 = KL only)."),
    ])


def check_modes(distill: bool, calib: bool, opts: dict[str, Any]) -> None:
    """``compress``: a usage error for an option that the modes asked for would ignore (the
    model options serve ``--distill`` and ``--calib``, the training ones ``--distill``)."""
    if not distill and not calib and opts["data"] is not None:
        raise click.UsageError("--data is used with --distill or --calib")
    if distill:
        require_model("--distill", opts)
    _used_without("--distill", distill, ("steps", "lr", "held_out", "hidden_weight"))
    _used_without("--distill or --calib", distill or calib,
                  ("base_model", "gguf_file", "max_tokens", "seq_len", "batch_size", "device"))


def require_model(what: str, opts: dict[str, Any]) -> None:
    """A usage error when ``what`` runs the base model on a text and either is not given."""
    missing = [f"--{n.replace('_', '-')}" for n in ("base_model", "data") if opts[n] is None]
    if missing:
        raise click.UsageError(f"{what} needs {' and '.join(missing)}")


def _used_without(needed: str, given: bool, params: tuple[str, ...]) -> None:
    """A usage error when an option of ``params`` was given on the command line while
    ``needed`` (the option it serves) was not: it would be silently ignored."""
    if given:
        return
    ctx = click.get_current_context()
    for name in params:
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError(f"--{name.replace('_', '-')} is used with {needed}")


def output_options(what: str, overwrite: str = "Replace an existing output folder.",
                   shown: str = "the table") -> Callable[[F], F]:
    """--overwrite, --quiet and --json (printing ``what`` instead of ``shown``)."""
    quiet = "No progress bar and no table." if shown == "the table" else f"Print nothing ({shown})."
    return lambda fn: _apply(fn, [
        click.option("--overwrite", is_flag=True, help=overwrite),
        click.option("--quiet", "-q", is_flag=True, help=quiet),
        click.option("--json", "as_json", is_flag=True, help=f"Print {what} instead of {shown}."),
    ])


def resolve_budget(opts: dict[str, Any]) -> dict[str, Any]:
    """``opts`` with ``ratio`` and ``quantize`` defaults resolved (they depend on
    ``--size-ratio``); ``--ratio`` with ``--size-ratio`` is a usage error."""
    if opts.get("size_ratio") is not None and opts.get("ratio") is not None:
        raise click.UsageError("give --ratio (parameters) or --size-ratio (bytes), not both")
    if opts.get("quantize") == "auto" and opts.get("size_ratio") is None:
        raise click.UsageError("--quantize auto chooses by size: it needs --size-ratio")
    out = dict(opts)
    if out.get("ratio") is None:
        out["ratio"] = 8.0
    if out.get("quantize") is None:
        out["quantize"] = "auto" if out.get("size_ratio") is not None else "none"
    return out


def convert_config(opts: dict[str, Any]) -> ConvertConfig:
    from ..fit.convert import ConvertConfig

    opts = resolve_budget(opts)
    config = ConvertConfig(**{k: opts[k] for k in CONVERT_KEYS})
    config.validate()
    return config


def data_spec(opts: dict[str, Any], need: str | None = None) -> DataSpec:
    """The model and text options; ``need``: the command that runs the model on the text
    (both must be given: a usage error otherwise)."""
    from ..pipeline import DataSpec

    if need is not None:
        require_model(need, opts)
    return DataSpec(**{k: opts[k] for k in DATA_KEYS})


def distill_config(opts: dict[str, Any]) -> DistillConfig:
    from ..model.distill import DistillConfig

    config = DistillConfig(steps=opts["steps"], lr=opts["lr"], batch_size=opts["batch_size"],
                           device=opts["device"], hidden_weight=opts["hidden_weight"],
                           seed=opts["seed"])
    config.validate()
    return config


class Bars:
    """Progress bars created on first use (terminals only; none with ``quiet``), closed on exit."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def bar(self, desc: str, **kw: Any) -> Any:
        if desc not in self.bars:
            from tqdm import tqdm

            self.bars[desc] = tqdm(desc=desc, file=sys.stderr, leave=False, disable=None, **kw)
        return self.bars[desc]

    def counter(self, desc: str, unit: str, total: int | None = None,
                label: Callable[..., str] | None = None) -> Callable[..., None] | None:
        """A callback that advances the bar ``desc`` by one (postfix ``label(*args)``)."""
        if self.quiet:
            return None

        def tick(*args: Any) -> None:
            b = self.bar(desc, unit=unit, total=total)
            b.update(1)
            if label is not None:
                b.set_postfix_str(label(*args))

        return tick

    def sizer(self, desc: str, unit: str) -> Callable[[int], None] | None:
        """A callback that gives the bar ``desc`` its total, once the work knows it."""
        if self.quiet:
            return None

        def size(n: int) -> None:
            b = self.bar(desc, unit=unit)
            b.total = n
            b.refresh()

        return size

    def __enter__(self) -> Bars:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.bars.values():
            b.close()
