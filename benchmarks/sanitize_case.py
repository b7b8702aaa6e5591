"""A small forward + backward through every GPU kernel of both ops, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py

Covers the vector path (D % 8 == 0) and the general path (odd D), fp32 / bf16 / fp64 values, the
atomic backward and the deterministic (sort + gather) backward, locations partly and fully off
the map and a level smaller than a 2x2 cell; then the Triton MSDA kernels on the same inputs (their
corner masks guard loads whose rows may lie off the map), and the channel_attention CUDA and Triton
kernels at an odd shape (the CUDA ones at 1, 2 and 4 rows per thread, DBSAM_CA_ROWS). Exits 0 when
it ran (the sanitizer reports errors). `--cuda-only` leaves the Triton kernels out (racecheck: their
shared memory is the compiler's, and racecheck over their JIT compile and launches ran past 90 s on
the H100, 2026-11-27).
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so every tensor is its own allocation and an
out-of-bounds access is caught even where the caching allocator would have hidden it.
"""
import os
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA device", file=sys.stderr)
        return 2
    import dbsam.ops  # noqa: F401  (loads dbsam._C)
    from dbsam.ops import _native
    from dbsam.ops.ms_deform_attn import level_layout

    if not _native.HAS_NATIVE_CUDA:
        print(f"sanitize_case: dbsam._C has no CUDA kernels: {_native.native_reason('cuda')}", file=sys.stderr)
        return 2
    fwd, bwd = torch.ops.dbsam.ms_deform_attn_forward, torch.ops.dbsam.ms_deform_attn_backward
    dev = torch.device("cuda")
    levels = [(5, 7), (3, 2), (1, 1)]
    spatial, starts = level_layout(levels, dev)
    S, L = sum(h * w for h, w in levels), len(levels)
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [(torch.float32, torch.float32, 64), (torch.bfloat16, torch.float32, 64), (torch.float16, torch.float16, 3),
             (torch.float32, torch.float32, 3), (torch.float64, torch.float64, 30)]
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        for vdt, cdt, D in cases:
            N, Lq, M, P = 2, 37, 3, 2
            value = torch.randn(N, S, M, D, generator=g).to(dev, vdt)
            loc = (torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.6 - 0.3).to(dev, cdt)
            attn = torch.rand(N, Lq, M, L, P, generator=g).to(dev, cdt)
            out = fwd(value, spatial, starts, loc, attn)
            go = torch.randn(out.shape, generator=g).to(dev, vdt)
            gv, gl, ga = bwd(go, value, spatial, starts, loc, attn)
            torch.cuda.synchronize()
            assert torch.isfinite(out.double()).all() and torch.isfinite(gv.double()).all()
            assert torch.isfinite(gl.double()).all() and torch.isfinite(ga.double()).all()
            print(f"ok deterministic={det} value={vdt} coords={cdt} D={D}")
    torch.use_deterministic_algorithms(False)
    other_backends(dev, spatial, starts, S, L, g, cuda_only="--cuda-only" in sys.argv[1:])
    return 0


def other_backends(dev, spatial, starts, S, L, g, cuda_only=False):
    from dbsam.ops import ChannelAttention, ms_deform_attn, use_backend
    from dbsam.ops._backends import why_not

    reason = "--cuda-only" if cuda_only else why_not("ms_deform_attn", "triton", dev)
    for vdt, D in ((torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 3)):
        if reason:
            print(f"skip triton ms_deform_attn: {reason}")
            break
        N, Lq, M, P = 2, 37, 3, 2
        value = torch.randn(N, S, M, D, generator=g).to(dev, vdt).requires_grad_()
        loc = (torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.6 - 0.3).to(dev).requires_grad_()
        attn = torch.rand(N, Lq, M, L, P, generator=g).to(dev).requires_grad_()
        out = ms_deform_attn(value, spatial, starts, loc, attn, backend="triton")
        grads = torch.autograd.grad(out, (value, loc, attn), torch.randn_like(out))
        torch.cuda.synchronize()
        assert all(torch.isfinite(t.double()).all() for t in (out, *grads))
        print(f"ok triton ms_deform_attn value={vdt} D={D}")
    for backend in ("cuda",) if cuda_only else ("cuda", "triton"):
        reason = why_not("channel_attention", backend, dev)
        if reason:
            print(f"skip {backend} channel_attention: {reason}")
            continue
        # The CUDA op's DW kernels at 1, 2 and 4 output rows per thread (DBSAM_CA_ROWS, read per call):
        # H = 7 leaves a partial last tile of rows at 2 and 4.
        for rows in ("1", "2", "4") if backend == "cuda" else ("",):
            os.environ.pop("DBSAM_CA_ROWS", None)
            if rows:
                os.environ["DBSAM_CA_ROWS"] = rows
            for dt in (torch.float32, torch.bfloat16):
                mod = ChannelAttention(24).to(dev, dt)
                x = torch.randn(2, 7, 5, 24, generator=g).to(dev, dt).requires_grad_()
                with use_backend(backend):
                    y = mod(x)
                    grads = torch.autograd.grad(y, (x, *mod.parameters()), torch.randn_like(y))
                torch.cuda.synchronize()
                assert all(torch.isfinite(t.double()).all() for t in (y, *grads))
                print(f"ok {backend} channel_attention dtype={dt} rows={rows or 'default'}")
            os.environ.pop("DBSAM_CA_ROWS", None)
        # A float32 x under bf16 autocast: the branch alone (residual=False: no copy of x, the GEMM's
        # beta 0, no grad_y in ln_backward), then the float32 residual.
        mod = ChannelAttention(24).to(dev)
        x = torch.randn(2, 7, 5, 24, generator=g).to(dev).requires_grad_()
        with use_backend(backend), torch.autocast(dev.type, dtype=torch.bfloat16):
            y = mod(x)
            grads = torch.autograd.grad(y, (x, *mod.parameters()), torch.randn_like(y))
        torch.cuda.synchronize()
        assert y.dtype == torch.float32 and all(torch.isfinite(t.double()).all() for t in (y, *grads))
        print(f"ok {backend} channel_attention float32 x under bf16 autocast")


if __name__ == "__main__":
    sys.exit(main())
