"""Shapes shared by the benchmarks: a Llama-2-7B rank-16 adapter on all 7 linear kinds."""

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
