"""Trims a build log (nvcc -Xptxas=-v output) to one line per ms_deform_attn kernel and arch.

    python benchmarks/ptxas_report.py build.log [--match msda_] > benchmarks/ptxas_ms_deform_attn.txt
    python benchmarks/ptxas_report.py build.log --match 5dbsam2ca > benchmarks/ptxas_channel_attention.txt

Each line: arch, registers, spill stores/loads, stack frame, and the demangled kernel name with
its template arguments (scalar type, coordinate type, VEC, SCATTER). Names are demangled with
c++filt when it is on PATH.
"""
import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
PROPS = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
REGS = re.compile(r"Used (?P<regs>\d+) registers")


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    # "void dbsam::msda::(anonymous namespace)::msda_forward_kernel<c10::Half, float, 8>(...)" -> kernel<...>
    name = re.sub(r"\(.*\)$", "", name.replace("(anonymous namespace)::", ""))
    name = name.replace("void ", "").replace("dbsam::msda::", "").replace("dbsam::ca::", "").replace("c10::", "")
    return name


def parse(text: str, match: str):
    rows, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"name": m["name"], "arch": m["arch"], "regs": None, "stack": None, "st": None, "ld": None}
            if match in cur["name"]:
                rows.append(cur)
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m and cur["stack"] is None:
            cur.update(stack=int(m["stack"]), st=int(m["st"]), ld=int(m["ld"]))
        m = REGS.search(line)
        if m and cur["regs"] is None:
            cur["regs"] = int(m["regs"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--match", default="msda_", help="substring of the mangled kernel names to keep")
    ap.add_argument("--header", default="", help="a first line saying how the log was made")
    args = ap.parse_args()
    rows = parse(open(args.log, errors="replace").read(), args.match)
    if not rows:
        print(f"no ptxas -v lines for kernels matching {args.match!r} in {args.log}", file=sys.stderr)
        return 1
    names = demangle(sorted({r["name"] for r in rows}))
    if args.header:
        print(args.header)
    print(f"{'arch':7} {'regs':>4} {'spill_st':>8} {'spill_ld':>8} {'stack':>5}  kernel")
    for r in sorted(rows, key=lambda r: (r["arch"], short(names[r["name"]]))):
        print(f"{r['arch']:7} {r['regs']!s:>4} {r['st']!s:>8} {r['ld']!s:>8} {r['stack']!s:>5}  {short(names[r['name']])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
