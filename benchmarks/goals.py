"""Each issue's benchmark goal, read off pytest-benchmark JSON files: what was measured, the target,
and whether it holds. The goals are the ones the issues state (H100; see benchmarks/NOTES.md):

  #5 CUDA MSDA   forward >= 50% of copy bandwidth (floor bytes) at the DB-SAM and ViT-Adapter
                 injector shapes, N = 8; forward+backward >= 1.5x deformops and >= 10x the
                 grid_sample reference at the same shapes and dtype
  #3 Triton MSDA within 1.3x of the CUDA kernel and ahead of deformops at the DB-SAM and ViT-Adapter
                 shapes, forward and forward+backward, bf16 and fp32 (N = 8, where the peers run)
  #4 adapter     B = 8, 64x64x768, bf16, forward+backward: >= 2.5x eager (NCHW, as the original
                 code runs it), >= 1.3x torch.compile(max-autotune), activations saved for backward
                 <= 1/3 of eager's
  #6 model       ViT-B 1024, bf16, batch 2 training step: fast ops >= 1.3x the reference ops, peak
                 memory <= 0.7x; batch 2 with gradient checkpointing within 16 GB

    python benchmarks/goals.py gpu_out/bench_*.json
    python benchmarks/goals.py --select model_goal   # the pytest -k expression of a goal's rows


A goal whose rows are missing from the files reads "not measured". Model-like sampling locations
only (the `uniform` rows are a cache stress case, not what the goals are stated on).
"""
import json
import re
import sys
from typing import Dict, Iterable, List, Optional, Tuple

MSDA_SHAPES = ("dbsam_vit_from_conv", "dbsam_pyramid", "vitadapter_injector", "vitadapter_extractor")
# #5's shapes (DB-SAM and the ViT-Adapter injector); #3's add the extractor.
MSDA_FORWARD_SHAPES = ("dbsam_vit_from_conv", "dbsam_pyramid", "vitadapter_injector")
DTYPES = ("bfloat16", "float32")
GB16_MIB = 16e9 / 2 ** 20  # "within 16 GB", decimal gigabytes
# pytest -k expressions of the rows that two goals read, for gpu_check.sh, which runs each first in a
# session of its own (a step cut by its time limit keeps them): #6's bf16 batch-2 training steps (with
# and without checkpointing, fast and reference ops) and #4's torch.compile(max-autotune) row.
SELECT = {
    "model_goal": "vit_b_train_step and 2-bf16",
    "ca_compile_goal": "max_autotune and 8x64x64x768 and bfloat16 and fwd_bwd",
}


def load(paths: Iterable[str]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f).get("benchmarks", [])
    return rows


def msda_table(rows) -> Dict[Tuple[str, str, int, str, str], dict]:
    """(mode, shape, N, dtype, backend) -> {median, pct_of_copy} for the model-location MSDA rows."""
    out = {}
    for b in rows:
        p = b.get("params") or {}
        name = b.get("name", "")
        if not name.startswith(("test_forward[", "test_forward_backward[")) or p.get("locality", "model") != "model":
            continue
        mode = "fwd_bwd" if name.startswith("test_forward_backward[") else "fwd"
        key = (mode, p.get("name"), int(p.get("N", 0)), str(p.get("dtype")), str(p.get("backend")))
        out[key] = {"median": (b.get("stats") or {}).get("median"),
                    "pct": (b.get("extra_info") or {}).get("pct_of_copy")}
    return out


_CA = re.compile(r"test_channel_attention\[(\d+)x(\d+)x(\d+)x(\d+)-(\w+?)-(fwd|fwd_bwd)-(\w+)\]")


def ca_table(rows) -> Dict[Tuple[str, str, str, str], dict]:
    """(shape 'BxHxWxC', dtype, mode, impl) -> {median, saved} for the adapter rows."""
    out = {}
    for b in rows:
        m = _CA.fullmatch(b.get("name", ""))
        if not m:
            continue
        shape = "x".join(m.group(i) for i in range(1, 5))
        out[(shape, m.group(5), m.group(6), m.group(7))] = {
            "median": (b.get("stats") or {}).get("median"),
            "saved": (b.get("extra_info") or {}).get("saved_activation_bytes")}
    return out


def model_table(rows) -> Dict[Tuple[str, str], dict]:
    """(group, row) -> {median, peak_MiB} for the ViT-B model rows (row: auto, reference, ...)."""
    out = {}
    for b in rows:
        group = b.get("group") or ""
        if not group.startswith("vit_b "):
            continue
        row = str((b.get("params") or {}).get("backend", ""))
        info = b.get("extra_info") or {}
        out[(group, row)] = {"median": (b.get("stats") or {}).get("median"), "peak": info.get("peak_memory_MiB"),
                             "start": info.get("allocated_at_start_MiB")}
    return out


# A peak counts only from a row that started with the device memory of the model alone: run 5's
# rows (results/h100_2026-11-27_dfbc80c) inherited what earlier rows left behind, and their peaks
# say nothing about the model. Rows since record allocated_at_start_MiB; within a group the two
# rows' starts must agree to this much.
START_SLACK_MIB = 256


def clean_peaks(*rows: Optional[dict]) -> Tuple[Optional[float], ...]:
    """The rows' peaks, or all None when any row lacks a peak or a start, or the starts disagree."""
    if any(not row or row.get("peak") is None or row.get("start") is None for row in rows):
        return (None,) * len(rows)
    starts = [row["start"] for row in rows]
    if max(starts) - min(starts) > START_SLACK_MIB:
        return (None,) * len(rows)
    return tuple(row["peak"] for row in rows)


class Report:
    def __init__(self):
        self.lines: List[Tuple[str, str, str, str, Optional[bool]]] = []

    def add(self, issue: str, what: str, measured: str, target: str, holds: Optional[bool]) -> None:
        self.lines.append((issue, what, measured, target, holds))

    def ratio(self, issue: str, what: str, num: Optional[float], den: Optional[float], target: float,
              unit: str = "x", higher_is_better: bool = True) -> None:
        if not num or not den:
            self.add(issue, what, "not measured", f">= {target}{unit}" if higher_is_better else f"<= {target}{unit}",
                     None)
            return
        value = num / den
        holds = value >= target if higher_is_better else value <= target
        self.add(issue, what, f"{value:.2f}{unit}", (">= " if higher_is_better else "<= ") + f"{target}{unit}",
                 holds)

    def print(self) -> None:
        print(f"{'issue':5} {'goal':62} {'measured':>13} {'target':>9}  verdict")
        for issue, what, measured, target, holds in self.lines:
            verdict = "not measured" if holds is None else ("holds" if holds else "MISSES")
            print(f"{issue:5} {what[:62]:62} {measured:>13} {target:>9}  {verdict}")
        counted = [h for *_, h in self.lines if h is not None]
        print(f"{sum(counted)} of {len(counted)} measured goals hold; {len(self.lines) - len(counted)} not measured")


def _median(table, key):
    row = table.get(key)
    return row["median"] if row else None


def evaluate(rows) -> Report:
    r = Report()
    msda = msda_table(rows)
    for shape in MSDA_FORWARD_SHAPES:
        for dt in DTYPES:
            row = msda.get(("fwd", shape, 8, dt, "cuda"))
            pct = row["pct"] if row else None
            r.add("#5", f"fwd % of copy, {shape} N8 {dt}", "not measured" if pct is None else f"{pct:.1f}%",
                  ">= 50%", None if pct is None else pct >= 50)
    for shape in MSDA_FORWARD_SHAPES:  # "at the same shapes": the DB-SAM ones and the injector
        for dt in DTYPES:
            cuda = _median(msda, ("fwd_bwd", shape, 8, dt, "cuda"))
            r.ratio("#5", f"fwd+bwd vs deformops, {shape} N8 {dt}", _median(msda, ("fwd_bwd", shape, 8, dt, "deformops")),
                    cuda, 1.5)
            r.ratio("#5", f"fwd+bwd vs reference, {shape} N8 {dt}", _median(msda, ("fwd_bwd", shape, 8, dt, "reference")),
                    cuda, 10)
    for shape in MSDA_SHAPES:
        for dt in DTYPES:
            for mode in ("fwd", "fwd_bwd"):
                triton = _median(msda, (mode, shape, 8, dt, "triton"))
                # time(triton) / time(cuda) <= 1.3; time(deformops) / time(triton) > 1
                r.ratio("#3", f"{mode} triton/cuda time, {shape} N8 {dt}", triton,
                        _median(msda, (mode, shape, 8, dt, "cuda")), 1.3, higher_is_better=False)
                r.ratio("#3", f"{mode} vs deformops, {shape} N8 {dt}", _median(msda, (mode, shape, 8, dt, "deformops")),
                        triton, 1.0)
    ca = ca_table(rows)
    key = ("8x64x64x768", "bfloat16", "fwd_bwd")
    ours = _median(ca, key + ("cuda",))
    r.ratio("#4", "adapter fwd+bwd vs eager NCHW, 8x64x64x768 bf16", _median(ca, key + ("eager_nchw",)), ours, 2.5)
    r.ratio("#4", "adapter fwd+bwd vs eager channels-last, 8x64x64x768 bf16",
            _median(ca, key + ("eager_channels_last",)), ours, 2.5)
    r.ratio("#4", "adapter fwd+bwd vs torch.compile max-autotune", _median(ca, key + ("compile_max_autotune",)),
            ours, 1.3)
    saved = (ca.get(key + ("cuda",)) or {}).get("saved")
    eager_saved = (ca.get(key + ("eager_nchw",)) or {}).get("saved")
    r.ratio("#4", "adapter saved activations / eager NCHW's", saved, eager_saved, round(1 / 3, 3),
            higher_is_better=False)
    model = model_table(rows)
    group = "vit_b train step batch 2 bf16"
    r.ratio("#6", "train step bf16 batch 2: reference time / fast", _median(model, (group, "reference")),
            _median(model, (group, "auto")), 1.3)
    peak, peak_ref = clean_peaks(model.get((group, "auto")), model.get((group, "reference")))
    r.ratio("#6", "train step bf16 batch 2: peak memory fast / reference", peak, peak_ref, 0.7,
            higher_is_better=False)
    ckpt, = clean_peaks(model.get((group + " grad-ckpt", "auto")))
    r.add("#6", "batch 2 bf16 with grad checkpointing: peak memory",
          "not measured" if ckpt is None else f"{ckpt / 1024:.1f} GiB", "<= 16 GB",
          None if ckpt is None else ckpt <= GB16_MIB)
    return r


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "--select":
        if len(argv) != 3 or argv[2] not in SELECT:
            print(f"--select takes one of {', '.join(SELECT)}", file=sys.stderr)
            return 2
        print(SELECT[argv[2]])
        return 0
    evaluate(load(argv[1:])).print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
