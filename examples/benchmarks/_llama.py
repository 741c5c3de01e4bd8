"""Shared by the benchmarks: Llama-2-7B rank-16 shapes on all 7 linear kinds, machine facts."""

import os
import platform

RANK, ALPHA = 16, 32
# (d_out, d_in) of each Llama-2-7B linear kind, and the submodule it lives in.
LLAMA2_7B = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def machine_info() -> dict:
    """Facts about the machine; no torch import here (see run_step)."""
    proc = platform.processor()
    if not proc or proc == platform.machine():
        try:  # Linux: platform.processor() is often empty or just "x86_64"
            with open("/proc/cpuinfo") as f:
                proc = next((line.split(":", 1)[1].strip() for line in f
                             if line.startswith("model name")), proc)
        except OSError:
            pass
    u = platform.uname()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = next((int(line.split()[1]) for line in f if line.startswith("MemTotal")), None)
    except OSError:
        pass
    return {
        "processor": proc or u.machine,
        "system": f"{u.system} {u.release} {u.machine}",
        "cpu_count": os.cpu_count(),
        "mem_total_kib": mem,
        "python": platform.python_version(),
    }
