"""Bar chart of the speed-ups over the reference backend, per shape and dtype, from the committed
pytest-benchmark JSON files under benchmarks/results/.

    python benchmarks/plot_results.py [--results benchmarks/results] [--out speedups.png] [--baseline reference]

Each benchmark group (one shape, batch and dtype, forward or forward+backward) becomes a cluster
of bars, one per backend, with height = median(baseline) / median(backend) on a log axis. With
several JSON files (several cards or runs) each file gets its own panel. The table of speed-ups is
printed too. matplotlib is an optional dependency: without it the script prints the table and
exits with status 3 and a message saying so.
"""
import argparse
import glob
import json
import os
import sys
from collections import OrderedDict


def load(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        params = b.get("params") or {}
        med = (b.get("stats") or {}).get("median")
        if not med:
            continue
        rows.append((b.get("group") or b.get("name", "?"), str(params.get("backend", "?")), float(med)))
    devices = {str((b.get("extra_info") or {}).get("device")) for b in data.get("benchmarks", [])
               if (b.get("extra_info") or {}).get("device")}
    label = ", ".join(sorted(devices)) or data.get("machine_info", {}).get("node", "?")
    return label, rows


def speedups(rows, baseline):
    """{group: {backend: speed-up}} for the groups that have the baseline."""
    by_group = OrderedDict()
    for group, backend, med in rows:
        by_group.setdefault(group, {})[backend] = med
    out = OrderedDict()
    for group, meds in by_group.items():
        if baseline not in meds:
            continue
        out[group] = {b: meds[baseline] / m for b, m in meds.items() if b != baseline}
    return out


def short_group(group):
    return group.replace("msda-", "").replace("fwdbwd-", "fwd+bwd ").replace("fwd-", "fwd ")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=os.path.join(here, "results"), help="folder searched for *.json")
    ap.add_argument("--out", default=None, help="PNG path (default: <results>/speedups.png)")
    ap.add_argument("--baseline", default="reference", help="the backend speed-ups are measured against")
    args = ap.parse_args(argv)

    files = sorted(glob.glob(os.path.join(args.results, "**", "*.json"), recursive=True))
    if not files:
        print(f"plot_results: no pytest-benchmark JSON files under {args.results}", file=sys.stderr)
        return 1
    panels = []
    for path in files:
        try:
            label, rows = load(path)
        except (OSError, ValueError) as exc:
            print(f"plot_results: skipping {path}: {exc}", file=sys.stderr)
            continue
        sp = speedups(rows, args.baseline)
        if sp:
            panels.append((f"{os.path.relpath(path, args.results)} ({label})", sp))
    if not panels:
        print(f"plot_results: no benchmark group with a {args.baseline!r} baseline in {len(files)} file(s)",
              file=sys.stderr)
        return 1

    for title, sp in panels:
        print(title)
        for group, per in sp.items():
            print(f"  {short_group(group):60} " + "  ".join(f"{b}={s:.2f}x" for b, s in sorted(per.items())))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results: matplotlib is not installed (an optional dependency: pip install matplotlib); "
              "printed the table only, no PNG written", file=sys.stderr)
        return 3

    out = args.out or os.path.join(args.results, "speedups.png")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.6 * max(len(sp) for _, sp in panels) + 3),
                                                      4.5 * len(panels)), squeeze=False)
    for ax, (title, sp) in zip(axes[:, 0], panels):
        groups = list(sp)
        backends = sorted({b for per in sp.values() for b in per})
        width = 0.8 / max(1, len(backends))
        for k, backend in enumerate(backends):
            xs = [i + (k - (len(backends) - 1) / 2) * width for i in range(len(groups))]
            ys = [sp[g].get(backend, float("nan")) for g in groups]
            ax.bar(xs, ys, width, label=backend)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"speed-up over {args.baseline}")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([short_group(g) for g in groups], rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot_results: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
