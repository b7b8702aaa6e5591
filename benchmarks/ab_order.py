"""A/B timing of the CUDA kernels' sample order (DBSAM_MSDA_ORDER=query|head) and of the load width
for fp16/bf16 (default: 16-byte forward, 8-byte atomic backward; DBSAM_MSDA_LOAD_BYTES=8 or 16 forces
one width on both, rows marked /8B and /16B), of grad_value added straight in bf16/fp16
(DBSAM_MSDA_LOWP_ATOMICS=1, rows marked /lowp), of the forward whose every lane locates its sample
point itself (DBSAM_MSDA_FWD_BCAST=0, rows marked /lanes, forward only; the default locates it once
per group of lanes), plus the
deterministic backward, at kernels.md shapes with model-like locations (msda_inputs.py) and one
uniform-location case. Prints one line per case: median microseconds of
the forward and of the backward op alone, and the forward's effective bandwidth (floor bytes /
time) against a device copy measured in the same run. Each order runs in a fresh process because
the kernels read the variable once.

    python benchmarks/ab_order.py            # both orders, from the repository root
"""
import os
import subprocess
import sys

INJECTOR_LEVELS = [(128, 128), (64, 64), (32, 32)]
CASES = {
    # name: (N, Lq, levels, M, D, P, value dtype, locality)
    "dbsam_vit_from_conv-N8-bf16": (8, 4096, [(64, 64)], 12, 64, 4, "bfloat16", "model"),
    "vitadapter_injector-N8-bf16": (8, 4096, INJECTOR_LEVELS, 12, 64, 4, "bfloat16", "model"),
    "vitadapter_injector-N8-f32": (8, 4096, INJECTOR_LEVELS, 12, 64, 4, "float32", "model"),
    "vitadapter_injector-N8-bf16-uniform": (8, 4096, INJECTOR_LEVELS, 12, 64, 4, "bfloat16", "uniform"),
    "detr_encoder-N2-f32": (2, 17821, [(100, 134), (50, 67), (25, 34), (13, 17)], 8, 32, 4, "float32", "model"),
}


# One child process per row (the kernels read their knobs once per process); {} is the default.
ROWS = (
    {"DBSAM_MSDA_ORDER": "query"}, {"DBSAM_MSDA_ORDER": "head"}, {},
    # fp16/bf16 with one load width forced on both directions
    {"DBSAM_MSDA_LOAD_BYTES": "8"}, {"DBSAM_MSDA_LOAD_BYTES": "16"},
    # the opt-in grad_value added straight in bf16/fp16; the forward default's predecessor (per-lane locate)
    {"DBSAM_MSDA_LOWP_ATOMICS": "1"}, {"DBSAM_MSDA_FWD_BCAST": "0"},
)
KNOBS = sorted({knob for row in ROWS for knob in row})


def child() -> None:
    import torch

    import dbsam.ops  # noqa: F401
    from msda_inputs import case_inputs

    fwd, bwd = torch.ops.dbsam.ms_deform_attn_forward, torch.ops.dbsam.ms_deform_attn_backward
    dev = torch.device("cuda")

    def median_us(fn, reps=30):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return sorted(times)[len(times) // 2]

    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() / (median_us(lambda: dst.copy_(src)) * 1e-6)
    order = os.environ.get("DBSAM_MSDA_ORDER", "default")
    if os.environ.get("DBSAM_MSDA_LOAD_BYTES") in ("8", "16"):
        order += "/" + os.environ["DBSAM_MSDA_LOAD_BYTES"] + "B"
    if os.environ.get("DBSAM_MSDA_LOWP_ATOMICS") == "1":
        order += "/lowp"
    fwd_only = os.environ.get("DBSAM_MSDA_FWD_BCAST") == "0"
    if fwd_only:  # a forward-only variant: the backward rows would repeat the default's
        order += "/lanes"
    for name, (N, Lq, levels, M, D, P, dt, locality) in CASES.items():
        dtype = getattr(torch, dt)
        g = torch.Generator(dev).manual_seed(0)
        value, spatial, starts, loc, attn = case_inputs(N, Lq, levels, M, D, P, dtype, device=dev, generator=g,
                                                        locality=locality)
        go = torch.randn(N, Lq, M * D, generator=g, device=dev).to(dtype)
        t_f = median_us(lambda: fwd(value, spatial, starts, loc, attn))
        t_b = t_d = float("nan")
        if not fwd_only:
            t_b = median_us(lambda: bwd(go, value, spatial, starts, loc, attn))
            torch.use_deterministic_algorithms(True)
            t_d = median_us(lambda: bwd(go, value, spatial, starts, loc, attn), reps=3)
            torch.use_deterministic_algorithms(False)
        floor = value.numel() * value.element_size() + loc.numel() * 4 + attn.numel() * 4 + go.numel() * go.element_size()
        print(f"order={order:7} {name:36} fwd {t_f:8.1f} us ({floor / t_f / 1e3:7.1f} GB/s, "
              f"{100 * floor / (t_f * 1e-6) / copy_bw:5.1f}% of copy {copy_bw / 1e9:.0f} GB/s)   "
              f"bwd {t_b:8.1f} us   bwd deterministic {t_d:8.1f} us", flush=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return 0
    rc = 0
    for row in ROWS:
        env = {k: v for k, v in os.environ.items() if k not in KNOBS}
        env.update(row)
        rc |= subprocess.call([sys.executable, os.path.abspath(__file__), "--child"], env=env)
    return rc


if __name__ == "__main__":
    sys.exit(main())
