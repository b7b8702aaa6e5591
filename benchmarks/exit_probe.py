"""Does a process that ran our ops exit cleanly? Counts abnormal exits per setting.

On the H100 (2026-11-27, runs 3 and 4) one `test_kernel_variants` subprocess in four printed "ok"
(parity held) and then aborted at interpreter exit: "terminate called without an active
exception", no Python frame. 30 CPU runs here never did. This script splits the suspects by
running a small child process `--runs` times in each setting:

    full        import dbsam.ops (Triton too), ms_deform_attn + channel_attention fwd+bwd through autograd
    no_triton   the same with `import triton` blocked (the Triton backend is then not registered)
    ops_only    the C++ ops called directly: no autograd, no Python-registered kernel runs
    torch_only  grid_sample fwd+bwd, dbsam never imported (torch's own teardown)
    drained     as full, then every tensor and module dropped, gc.collect(), a device sync and a
                short sleep before the interpreter finalizes

The leading suspect since session 4 is upstream: the discussion of pytorch/pytorch#190489 (open,
2026) traces a crash to autograd worker threads that release Python objects (a GraphTask's) while
the interpreter finalizes; the release takes the GIL, the thread is pthread_exit-ed and its forced
unwind through C++ frames ends in std::terminate, "terminate called without an active exception".
Our ops' autograd formulas were Python (torch.library.register_autograd) when runs 3 and 4 aborted,
so their graphs held Python objects. Since 2026-12-03 the native ops' autograd is C++
(csrc/*/autograd.cpp) and their graphs hold none; the Triton ops' formulas are still Python. If
`full` aborts now and then and `drained` never does, that is the race, and draining before exit is
the workaround (the CUDA variant tests' children drain).

    python benchmarks/exit_probe.py [--runs 10] [--device cuda|cpu]

Prints one line per setting (exits that were not 0, with the first stderr tail) and exits 1 when
any child exited abnormally.
"""
import argparse
import os
import subprocess
import sys

MODES = ("full", "no_triton", "ops_only", "torch_only", "drained")


def child(mode: str, device: str) -> None:
    if mode == "no_triton":
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
    import torch

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    if mode == "torch_only":
        x = torch.randn(2, 8, 9, 11, generator=g).to(dev).requires_grad_()
        grid = (torch.rand(2, 5, 4, 2, generator=g) * 2 - 1).to(dev)
        torch.nn.functional.grid_sample(x, grid, align_corners=False).sum().backward()
    else:
        try:
            import dbsam.ops as ops
        except ImportError:  # run from a checkout that is not installed: the repository's own tree
            sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            import dbsam.ops as ops
        from dbsam.ops import _native
        from dbsam.ops.ms_deform_attn import level_layout

        if mode == "ops_only" and not (_native.HAS_NATIVE_CUDA if dev.type == "cuda" else _native.HAS_NATIVE):
            print(f"skip: no native {dev.type} kernels in this build ({_native.native_reason(dev.type)})", flush=True)
            return

        spatial, starts = level_layout([(5, 7), (3, 2)], dev)
        value = torch.randn(2, 41, 3, 16, generator=g).to(dev)
        loc = torch.rand(2, 9, 3, 2, 2, 2, generator=g).to(dev)
        attn = torch.rand(2, 9, 3, 2, 2, generator=g).to(dev)
        if mode == "ops_only":
            out = torch.ops.dbsam.ms_deform_attn_forward(value, spatial, starts, loc, attn)
            torch.ops.dbsam.ms_deform_attn_backward(torch.ones_like(out), value, spatial, starts, loc, attn)
        else:
            value.requires_grad_()
            ops.ms_deform_attn(value, spatial, starts, loc, attn).sum().backward()
            mod = ops.ChannelAttention(24).to(dev)
            x = torch.randn(2, 7, 5, 24, generator=g).to(dev).requires_grad_()
            mod(x).sum().backward()
            if mode == "drained":
                del value, loc, attn, mod, x
    if dev.type == "cuda":
        torch.cuda.synchronize()
    if mode == "drained":
        drain(dev)
    print("ok", flush=True)


def drain(dev) -> None:
    """Lets autograd's worker threads release what they hold before the interpreter finalizes."""
    import gc
    import time

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--child", choices=MODES)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.device)
        return 0
    # The children import dbsam as this process would (the installed package, or PYTHONPATH);
    # an uninstalled checkout falls back to its own tree (see child()).
    bad_any = False
    for mode in MODES:
        bad, first, skipped = 0, "", ""
        for _ in range(args.runs):
            res = subprocess.run([sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--child", mode,
                                  "--device", args.device], capture_output=True, text=True, timeout=300)
            if res.returncode == 0 and res.stdout.startswith("skip:"):
                skipped = res.stdout.strip()
                break
            if res.returncode != 0 or "ok" not in res.stdout:
                bad += 1
                first = first or f"status {res.returncode}: {res.stderr.strip()[-300:]}"
        bad_any |= bad > 0
        if skipped:
            print(f"exit_probe {mode:10} {args.device}: {skipped}", flush=True)
            continue
        print(f"exit_probe {mode:10} {args.device}: {bad} of {args.runs} exited abnormally"
              + (f"; first: {first}" if first else ""), flush=True)
    return 1 if bad_any else 0


if __name__ == "__main__":
    sys.exit(main())
