"""Prints a short table from pytest-benchmark JSON files: median time per benchmark, the speed-up
over the reference backend of the same group, and the extra_info fields (effective GB/s, % of
copy bandwidth, and host_us: the time a step takes to queue its launches, near the median when the
step is host-bound) when the benchmark recorded them, and the peak GPU memory with its ratio to the
reference's and the activation bytes saved for backward where the benchmark recorded them (the
model benchmarks). Then, where a group has A/B rows of a CUDA op's knobs (backends cuda_<variant>),
each variant's time over the default `cuda` row's (run 5's forward-only rows of the fused-grad knob,
which cannot change the forward, read 0.88-0.99: take a ratio as a gain only beyond that spread and
in both C).

    python benchmarks/gpu_report.py gpu_out/bench_*.json
"""
import json
import sys


def rows_of(data):
    rows = []
    for b in data.get("benchmarks", []):
        params = b.get("params") or {}
        name = b.get("name", "?")
        backend = str(params.get("backend", params.get("impl", params.get("path", name))))
        group = b.get("group")
        if not group:  # e.g. test_channel_attention[8x64x64x768-bfloat16-fwd-cuda]: drop the backend id
            group = name[:-len(backend) - 2] + "]" if name.endswith(f"-{backend}]") else name
        rows.append({
            "group": group,
            "backend": backend,
            "name": name,
            "median": (b.get("stats") or {}).get("median"),
            "extra": b.get("extra_info") or {},
        })
    return rows


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows, data = [], {}
    for path in argv[1:]:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"gpu_report: cannot read {path}: {exc}", file=sys.stderr)
            continue
        rows += rows_of(data)
    if not rows:
        print(f"gpu_report: no benchmarks in {' '.join(argv[1:])}")
        return 1
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('node', '?')} {machine.get('cpu', {}).get('brand_raw', '')}".rstrip())
    # Baseline per group: the reference backend, or eager PyTorch written NCHW (channel_attention).
    ref, ref_mem = {}, {}
    for base in ("eager_nchw", "reference"):
        ref.update({r["group"]: r["median"] for r in rows if r["backend"] == base and r["median"]})
        ref_mem.update({r["group"]: r["extra"]["peak_memory_MiB"] for r in rows
                        if r["backend"] == base and r["extra"].get("peak_memory_MiB")})
    with_mem = any(r["extra"].get("peak_memory_MiB") for r in rows)
    # left_MiB: device memory a model row left allocated (test_model.py's guard; run 5's leak grew
    # every later row's peak, and a non-zero figure here says a peak is not the row's own).
    with_left = any("left_behind_MiB" in r["extra"] for r in rows)
    # ops: ATen ops a model training step dispatches (op_count.py), each a dispatch on the host.
    with_ops = any("aten_ops_per_step" in r["extra"] for r in rows)
    mem_head = (f" {'peak_MiB':>9} {'mem/ref':>7} {'saved_MiB':>9}" if with_mem else "") + (
        f" {'left_MiB':>8}" if with_left else "") + (f" {'ops':>6}" if with_ops else "")
    print(f"{'group':52} {'backend':18} {'median_us':>10} {'vs_ref':>7} {'GB/s':>8} {'%copy':>6} {'host_us':>8}"
          + mem_head)
    for r in sorted(rows, key=lambda r: (r["group"], r["median"] or float("inf"))):
        med = r["median"]
        us = f"{med * 1e6:.1f}" if med else "-"
        speed = f"{ref[r['group']] / med:.1f}x" if med and r["group"] in ref else "-"
        gbps = r["extra"].get("effective_GBps", "-")
        pct = r["extra"].get("pct_of_copy", "-")
        host = r["extra"].get("host_us", "-")
        mem = ""
        if with_mem:
            peak = r["extra"].get("peak_memory_MiB")
            ratio = f"{peak / ref_mem[r['group']]:.2f}x" if peak and r["group"] in ref_mem else "-"
            saved = r["extra"].get("saved_for_backward_MiB", "-")
            mem = f" {peak if peak else '-'!s:>9} {ratio:>7} {saved!s:>9}"
        if with_left:
            mem += f" {r['extra'].get('left_behind_MiB', '-')!s:>8}"
        if with_ops:
            mem += f" {r['extra'].get('aten_ops_per_step', '-')!s:>6}"
        print(f"{r['group'][:52]:52} {r['backend'][:18]:18} {us:>10} {speed:>7} {gbps!s:>8} {pct!s:>6} {host!s:>8}"
              + mem)
    ab_table(rows)
    return 0


def ab_table(rows) -> None:
    """The A/B rows of a CUDA op's knobs (backends named cuda_<variant>, e.g. the adapter's cuda_rows2)
    against the default `cuda` row of the same group: time ratio, under 1 where the variant is faster.
    What a default is flipped on (benchmarks/NOTES.md), one line per group."""
    default = {r["group"]: r["median"] for r in rows if r["backend"] == "cuda" and r["median"]}
    variants = sorted({r["backend"] for r in rows if r["backend"].startswith("cuda_")})
    lines = []
    for group in sorted(default):
        here = {r["backend"]: r["median"] for r in rows if r["group"] == group and r["median"]}
        if not any(v in here for v in variants):
            continue
        cells = [f"{here[v] / default[group]:.2f}" if v in here else "-" for v in variants]
        lines.append(f"{group[:52]:52} {default[group] * 1e6:>10.1f} " + " ".join(f"{c:>12}" for c in cells))
    if lines:
        print("\nA/B: variant time / default (cuda) time, < 1 faster")
        print(f"{'group':52} {'cuda_us':>10} " + " ".join(f"{v[5:][:12]:>12}" for v in variants))
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
