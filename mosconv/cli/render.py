"""Text rendering of what the commands print: tables, reports, summaries (no click)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..fit.report import Report

if TYPE_CHECKING:
    from ..batch.run import Summary


def table(rows: list[list[Any]], headers: list[str]) -> str:
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


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_lora_inspect(info: dict[str, Any]) -> str:
    """``inspect`` on a LoRA (``info``: :func:`mosconv.inspect.inspect_lora`)."""
    lora = info["lora_params"]
    stored = info.get("stored_params", lora)  # LyCORIS: the file's own count differs
    params = (f"LoRA params   {lora:,}" if stored == lora else
              f"params        {stored:,} stored in the file; LoRA-equivalent {lora:,} (the "
              "exact factorization, the reference for --ratio)")
    alpha = info["lora_alpha"]
    if alpha is None:  # the scales say what was used
        alpha = "- (PEFT's default 8)" if info["format"] == "peft" else "-"
    out = [
        f"format        {info['format']}  (dtype {info['dtype']}"
        + (", fan_in_fan_out" if info["fan_in_fan_out"] else "") + ")",
        f"base model    {info['base_model'] or '-'}   task {info['task_type'] or '-'}",
        "files         " + ", ".join(f"{f['path']} ({fmt_bytes(f['bytes'])})" for f in info["files"]),
        (f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ranks "
         f"{info['ranks']}, alpha {alpha}, scales {info['scales']}"),
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


def render_report(report: Report) -> str:
    """The short table printed after a conversion (and by inspect on a MoS folder)."""
    t = report.totals
    data = t.data
    headers = ["kind", "structure", "nc", "pool A/B", "params", "rel.err", "trunc.err"]
    if data:
        headers += ["data err", "data trunc"]
    rows = []
    for k in report.kinds:
        s = k.structure
        rows.append([k.kind, s.structure, s.nc, f"{s.pool_A}/{s.pool_B}", f"{s.params:,}",
                     f"{k.relative_error:.4f}", f"{k.truncation_relative_error:.4f}"])
        if k.data:
            rows[-1] += [f"{k.data.data_relative_error:.4f}",
                         f"{k.data.data_truncation_relative_error:.4f}"]
    out = [table(rows, headers), ""]
    stored = t.source_params if t.source_params is not None else t.lora_params
    out.append(
        f"params {t.lora_params:,} -> {t.mos_params:,} (x{t.param_ratio or 0:.2f}, budget "
        f"{t.budget:,}); index {fmt_bytes(t.index_bytes)}"
        + (f"; the {t.source_format} file stores {stored:,}" if stored != t.lora_params else "")
        + (f"; own {t.local_params:,} + shared pool" if t.local_params is not None
           and t.local_params != t.mos_params else "")
        + (f"; file x{t.file_bytes_ratio:.2f} smaller" if t.file_bytes_ratio else "")
        + (" (its own file; the group's pool file is shared)" if t.file_bytes_ratio
           and t.local_params is not None and t.local_params != t.mos_params else "")
    )
    if t.mos_tensor_bytes is not None and t.lora_tensor_bytes:
        b = t.mos_bytes or {}
        parts = ", ".join(f"{k} {fmt_bytes(b[k])}" for k in
                          ("shards", "cores", "scales", "routes", "weights") if b.get(k))
        storage = t.quantize if t.quantize not in (None, "none") else t.dtype
        out.append(
            f"bytes {fmt_bytes(t.lora_tensor_bytes)} -> {fmt_bytes(t.mos_tensor_bytes)} "
            f"(x{t.tensor_bytes_ratio or 0:.2f}, {storage}" + (f": {parts}" if parts else "")
            + ")" + (f"; truncation stored alike in <= these bytes "
                     f"{t.truncation_equal_bytes_relative_error:.4f}"
                     if t.truncation_equal_bytes_relative_error is not None else ""))
    if t.size_choices:
        tried = "; ".join(
            f"{c['quantize'] if c['quantize'] != 'none' else c['dtype']} "
            + (f"x{c['param_ratio']:.1f} params" if c["param_ratio"] else "no params")
            + f" {c['relative_error']:.4f}"
            for c in t.size_choices)
        out.append(f"--size-ratio {t.size_ratio:g} (<= {fmt_bytes(t.size_budget_bytes or 0)}): "
                   f"chose {storage} at parameter ratio x{t.param_ratio or 0:.2f}; tried {tried}")
    own = t.local_params if t.local_params is not None else t.mos_params  # a zoo member's
    if t.source_params is not None and own > t.source_params:  # pool file is not its own
        out.append(f"note: the MoS adapter holds more parameters than the {t.source_format} "
                   f"file ({t.source_params:,}): its Hadamard/Kronecker structure stores less "
                   "than a LoRA of the update's rank; a larger ratio gives a smaller file")
    gain = (f"   (sharing gain {t.sharing_gain:+.4f}, {t.kinds_shared} of "
            f"{len(report.kinds)} kinds shared)")
    # truncation at the adapter's parameters, measured in float32: the same budget only for
    # a float32 adapter (the bytes line above gives truncation stored alike)
    alike = t.dtype in (None, "float32") and t.quantize in (None, "none") and not t.size_ratio
    out.append(f"relative error {t.relative_error:.4f}   truncation at the same "
               + ("budget " if alike else "params in float32 ")
               + f"{t.truncation_relative_error:.4f}" + ("" if data else gain))
    if data:  # the conversion minimized this metric; its baseline is data-aware truncation
        out.append(
            f"data-aware error {data.data_relative_error:.4f}   data-aware truncation "
            f"{data.data_truncation_relative_error:.4f}   plain truncation "
            f"{data.plain_truncation_data_relative_error:.4f}   ({data.calib_tokens:,} tokens)"
            + gain)
    d = report.distill
    if d:
        out.append(
            f"held-out KL(teacher||student) {d.kl_before:.5f} -> {d.kl_after:.5f} after "
            f"{d.steps} steps ({d.device}, {d.steps_per_s or 0:.2f} steps/s); truncation at "
            f"the same budget{_stored_alike(t)} {d.truncation_kl:.5f}")
    return "\n".join(out)


def _stored_alike(t) -> str:
    """How the distillation's truncation baseline is stored when the adapter is not stored in
    float32: like the adapter (the weight line's truncation is float32)."""
    quantize = t.quantize if t.quantize not in (None, "none") else None
    dtype = t.dtype if t.dtype not in (None, "float32") else None
    how = quantize or dtype
    return f", stored alike ({how})" if how else ""


def _made_by_batch(info: dict[str, Any]) -> str | None:
    """How a ``batch`` output was made: its settings (and its group, with shared pools)."""
    if not info.get("batch"):
        return None
    settings = ", ".join(f"{k} {v}" for k, v in info["batch"].items())
    group = f"; group {info['zoo_group']}" if info.get("zoo_group") else ""
    return f"mosconv batch ({settings}{group})"


def render_mos_inspect(info: dict[str, Any]) -> str:
    """``inspect`` on a MoS folder (``info``: :func:`mosconv.inspect.inspect_mos`)."""
    out = [
        f"MoS adapter   format v{info['format_version']}, mosconv {info.get('mosconv_version')}",
        f"source        {info['source_format']} ({info.get('base_model') or '-'})",
        f"modules       {info['num_modules']} in {info['num_kinds']} kinds, ratio {info.get('ratio')}",
        f"params        {info['params']:,}  index {fmt_bytes(info['index_bytes'])}",
        _storage_line(info),
        f"command       {info.get('command') or _made_by_batch(info) or '-'}",
        "",
    ]
    if info.get("report"):
        out.append(render_report(Report.from_json(info["report"])))
    else:
        rows = [[k["kind"], k["nc"], k["pool_A"], k["pool_B"], k["public_A"], k["public_B"]]
                for k in info["kinds"]]
        out.append(table(rows, ["kind", "nc", "pool A", "pool B", "public A", "public B"]))
    return "\n".join(out)


def render_serving(info: dict[str, Any]) -> str:
    """``inspect --serving`` (``info``: :func:`mosconv.inspect.inspect_serving`)."""
    n = info["adapters"]
    rows = [[m["name"], fmt_bytes(m["own_bytes"]), fmt_bytes(m["lora_bytes"])]
            for m in info["members"][:20]]
    out = [table(rows, ["adapter", "own (resident)", "as a LoRA"])]
    if n > 20:
        out.append(f"... {n - 20} more")
    ratio = info["ratio_to_lora"]
    if ratio and ratio >= 1:
        compared = f" (x{ratio:.2f} less)"
    elif ratio:
        compared = f" (x{1 / ratio:.2f} more)"
    else:
        compared = ""
    out += ["", (f"{n} adapter{'s' * (n != 1)}: shared pools "
                 f"{fmt_bytes(info['shared_bytes'])} once ({info['shared_pool_files']} pool "
                 f"file{'s' * (info['shared_pool_files'] != 1)}), own parts {fmt_bytes(info['own_bytes_mean'])} per adapter on "
                 f"average; total {fmt_bytes(info['total_bytes'])} against "
                 f"{fmt_bytes(info['lora_total_bytes'])} as LoRAs{compared}"),
            "(resident bytes in a float32 model, from the files: 4 bytes a value, 8 a route)"]
    return "\n".join(out)


def _storage_line(info: dict[str, Any]) -> str:
    st, b = info.get("storage") or {}, info.get("tensor_bytes") or {}
    how = st.get("dtype", "float32")
    if st.get("quantize", "none") != "none":
        how = (f"{st['quantize']} (float16 scales per {st.get('group')} values; slot weights "
               f"{st.get('dtype')})")
    parts = ", ".join(f"{k} {fmt_bytes(b[k])}" for k in
                      ("shards", "cores", "scales", "routes", "weights", "extra") if b.get(k))
    return (f"storage       {how}; tensors {fmt_bytes(b.get('total', 0))}"
            + (f" ({parts})" if parts else ""))


def render_eval(res: dict, data: str) -> str:
    """``mosconv eval``'s table."""
    rows = [["base", f"{res['ppl_base']:.3f}", f"{res['kl_teacher_base']:.5f}", "0"],
            ["teacher", f"{res['ppl_teacher']:.3f}", "0", "1"],
            ["student", f"{res['ppl_student']:.3f}", f"{res['kl_teacher_student']:.5f}",
             f"{res['effect_retained']:.4f}" if res["effect_retained"] is not None else "-"]]
    return (table(rows, ["model", "perplexity", "KL(teacher||.)", "effect retained"])
            + f"\n{res['tokens']:,} tokens of {data}")


def render_summary(summary: Summary) -> str:
    """``batch``'s table and zoo totals."""
    rows = []
    sized = summary.size_ratio is not None  # the baseline: truncation in no more bytes
    for a in summary.adapters:
        err = f"{a.relative_error:.4f}" if a.relative_error is not None else "-"
        base = a.truncation_equal_bytes_relative_error if sized else a.truncation_relative_error
        trunc = f"{base:.4f}" if base is not None else "-"
        params = (f"{a.lora_params:,} -> {a.local_params:,}" if a.lora_params is not None
                  else "-")
        rows.append([a.name, a.status, params, err, trunc, f"{a.seconds:.1f}",
                     (a.error or "")[:80]])
    out = [table(rows, ["adapter", "status", "params (own)", "rel.err",
                        "trunc.bytes" if sized else "trunc.err", "s", "error"])]
    t = summary.totals
    out.append("")
    line = (f"{t.adapters} adapters: {t.converted} converted, {t.skipped} skipped, "
            f"{t.failed} failed; params {t.lora_params:,} -> {t.mos_params:,}")
    if t.shared_pool_params:
        line += f" (incl. {t.shared_pool_params:,} in shared pools)"
    out.append(line)
    if t.lora_tensor_bytes and t.mos_tensor_bytes:
        out.append(f"tensor bytes {fmt_bytes(t.lora_tensor_bytes)} -> "
                   f"{fmt_bytes(t.mos_tensor_bytes)} (x{t.lora_tensor_bytes / t.mos_tensor_bytes:.1f}"
                   + (f"; shared pools {fmt_bytes(t.shared_pool_bytes)} once)"
                      if t.shared_pool_bytes else ")"))
    if t.relative_error is not None:
        base = (f"truncation in no more bytes {t.truncation_equal_bytes_relative_error:.4f}"
                if sized and t.truncation_equal_bytes_relative_error is not None
                else f"truncation {t.truncation_relative_error:.4f}")
        out.append(f"zoo relative error {t.relative_error:.4f}   {base} (energy-weighted over "
                   "adapters)")
    for g in summary.groups:
        if g.pool_file is None:
            continue
        size = (f", {fmt_bytes(g.lora_tensor_bytes)} -> {fmt_bytes(g.mos_tensor_bytes)}"
                if g.lora_tensor_bytes and g.mos_tensor_bytes else "")
        base = (f"truncation in no more bytes {g.truncation_equal_bytes_relative_error:.4f}"
                if sized and g.truncation_equal_bytes_relative_error is not None
                else f"truncation {g.truncation_relative_error:.4f}")
        err = "" if g.relative_error is None else f"; error {g.relative_error:.4f}, {base}"
        out.append(f"group {g.group}: {g.adapters} adapter{'s' * (g.adapters != 1)}, params "
                   f"{g.lora_params:,} -> {g.mos_params:,} (pool {g.pool_params:,} once + own "
                   f"{g.local_params:,}){size}{err}")
        if g.also_serves:
            gone = ", ".join(g.also_serves[:3]) + (", ..." if len(g.also_serves) > 3 else "")
            out.append(f"  note: its pools also serve {gone}, not converted in this "
                       "run (left the zoo, or failed): they count against its budget; --refit "
                       "refits the group for the adapters it has")
    return "\n".join(out)
