#!/usr/bin/env bash
# The one-call GPU check. From the repository root:
#     OUT=./gpu_out bash benchmarks/gpu_check.sh                      # the check: ~7 minutes on an H100 (run 5's step times)
#     OUT=./gpu_out GPU_CHECK_MODE=full bash benchmarks/gpu_check.sh  # and the diagnostics: ~14 minutes
# The check (GPU_CHECK_MODE=core, the default; step times from H100 run 5, NOTES.md section 12):
#   info       card, driver, torch/CUDA/Triton versions, git commit
#   build      in-place build for the H100 (MAX_JOBS=16 DBSAM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0; ~60 s;
#              reused on a second call when benchmarks/build_key.py says nothing it reads changed),
#              ptxas register/spill report of our kernels -> $OUT/ptxas_sm90.txt (MSDA), ptxas_ca_sm90.txt
#   tests_cuda pytest tests/ops/test_ms_deform_attn_cuda.py, junit -> $OUT/junit_cuda.xml (~35 s)
#   tests      the rest of pytest tests/ops (Triton and the general files' GPU cases) and the ViT
#              attention's fused-kernel test (tests/model/test_vit_attention.py), junit -> $OUT/junit_ops.xml
#              (~50 s; the two CPU inductor compiles that CI runs are left out here: 60 s each)
#   memcheck   compute-sanitizer --tool memcheck on benchmarks/sanitize_case.py (both ops, CUDA and
#              Triton kernels), a second pass with DBSAM_MSDA_LOAD_BYTES=8 DBSAM_MSDA_LOWP_ATOMICS=1
#              DBSAM_MSDA_FWD_BCAST=0 DBSAM_CA_VEC=1 DBSAM_CA_FUSED_GRAD=1 (~65 s)
#   racecheck  compute-sanitizer --tool racecheck on the same script (CUDA kernels; again with DBSAM_CA_VEC=1; ~30 s)
#   bench_msda, bench_ca, bench_model: pytest-benchmark, one JSON each (a cut step loses only its own
#              figures), --benchmark-json=$OUT/bench_<name>.json (~45, ~45, ~140 s: the model rows also
#              time their host side and count their ops)
#   report     a table of every benchmark JSON (benchmarks/gpu_report.py) and the issues' goals (goals.py)
# The diagnostics (GPU_CHECK_MODE=full adds them, after the check):
#   profile    benchmarks/profile_ops.py: per-kernel CUDA time of one fwd+bwd of each op, ours and the
#              peers', with host and wall time (~40 s)
#   profile_model  benchmarks/profile_model.py: #6's training step (ViT-B, bf16, batch 2; fast path and
#              reference) by kernel kind, launches, host and wall time (~60 s, mostly building ViT-B)
#   ncu        Nsight Compute sections of each op's kernels, benchmarks/ncu_case.py (~20 s)
#   ab         benchmarks/ab_order.py: the MSDA kernels' A/B knobs and the deterministic backward (~65 s)
#   exit_probe benchmarks/exit_probe.py: how many short processes that ran our ops abort at
#              interpreter exit, per suspect (NOTES.md section 8; ~100 s)
#   bench_slow torch.compile(mode="max-autotune") of the adapter (#4's goal row first), torch.compile
#              of the MSDA reference and the Triton autotune sweep (minutes of compiling; one JSON each)
# Each step runs under `timeout`, the whole run capped at GPU_CHECK_BUDGET_S (default 470 s, full 1000), of which
# the last 15 s are kept for the report; a step that would start with under 15 s left is marked
# failed, not run. Logs: $OUT/<step>.log. A failed step does not stop the run; the exit status is
# non-zero when any step failed. Without a GPU (no working nvidia-smi) the GPU steps are skipped,
# and say so. Knobs: PYTHON (default: the first of python, python3 that imports torch), MAX_JOBS
# (16), TORCH_CUDA_ARCH_LIST (9.0), GPU_CHECK_MODE=core|full, GPU_CHECK_SKIP=<space-separated step
# names> to skip steps by hand, GPU_CHECK_TAR=<file.tgz> to pack $OUT into one archive at the end.
# On the lent H100 (one call, logs back through its $OUT):
#   OUT=/tmp/gc GPU_CHECK_TAR=$OUT/gc.tgz bash benchmarks/gpu_check.sh   (with .whl/ carried)
set -u

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then  # the first python on PATH that has torch
  for cand in python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PYTHON=$(command -v "$cand"); break; fi
  done
  PYTHON=${PYTHON:-python3}
fi
REPORT_RESERVE_S=15
SKIP=" ${GPU_CHECK_SKIP:-} "
MODE=${GPU_CHECK_MODE:-core}
DIAGNOSTICS=" profile profile_model ncu ab exit_probe bench_slow "
case "$MODE" in core|full) ;; *) echo "GPU_CHECK_MODE must be core or full, got '$MODE'" >&2; exit 2 ;; esac
# The check fits 8 minutes; the diagnostics add about as much again (a lent machine's call caps at
# 10 minutes: set GPU_CHECK_BUDGET_S there).
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$MODE" = full ] && echo 1000 || echo 470)}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch picks CUDA_HOME from the nvcc on PATH; a stray /usr/local/bin/nvcc makes it /usr/local.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"

# The GPU machine has no network: pure-Python packages it lacks (segment-anything, deformops)
# travel as wheels in .whl/ (git-ignored; see benchmarks/NOTES.md for the download command).
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dbsam_site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/dbsam_site"
fi

SUMMARY=()
FAILED=0

HAVE_GPU=0
GPU_WHY="nvidia-smi not found"
if command -v nvidia-smi >/dev/null 2>&1; then
  if nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; GPU_WHY=""; else GPU_WHY="nvidia-smi finds no GPU"; fi
fi

# run_step NAME TIMEOUT_S NEEDS_GPU(0/1) COMMAND...  -> logs to $OUT/NAME.log, records the outcome.
run_step() {
  local name=$1 limit=$2 gpu=$3; shift 3
  local now left t0 rc dt need
  # The last 15 s of the budget are kept for the report (the short table always comes out, of
  # whatever benchmarks ran; run 3 lost it to the budget): other steps see them as spent.
  now=$(date +%s); left=$((BUDGET - (now - START)))
  [ "$name" != report ] && left=$((left - REPORT_RESERVE_S))
  if [[ "$SKIP" == *" $name "* ]]; then
    SUMMARY+=("SKIP  $name  (GPU_CHECK_SKIP)"); echo "== $name: SKIPPED (GPU_CHECK_SKIP)"; return 0
  fi
  if [ "$MODE" != full ] && [[ "$DIAGNOSTICS" == *" $name "* ]]; then
    SUMMARY+=("SKIP  $name  (a diagnostic: GPU_CHECK_MODE=full runs it)"); return 0
  fi
  if [ "$gpu" = 1 ] && [ "$HAVE_GPU" = 0 ]; then
    SUMMARY+=("SKIP  $name  (needs a GPU: $GPU_WHY)"); echo "== $name: SKIPPED, needs a GPU ($GPU_WHY)"; return 0
  fi
  need=15
  [ "$name" = report ] && need=3  # a table of the JSON already written takes a second
  if [ "$left" -lt "$need" ]; then
    SUMMARY+=("FAIL  $name  (no time left in the ${BUDGET}s budget)"); FAILED=1
    echo "== $name: NOT RUN, ${left}s left of the ${BUDGET}s budget"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s) -> $OUT/$name.log"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  tail -n "${TAIL_LINES:-15}" "$OUT/$name.log" | sed 's/^/   | /'
  if [ $rc -eq 0 ]; then
    SUMMARY+=("PASS  $name  (${dt}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    SUMMARY+=("FAIL  $name  (timed out after ${limit}s)"); FAILED=1
  elif [ $rc -eq 5 ] && grep -q "no tests ran\|collected 0 items" "$OUT/$name.log"; then
    SUMMARY+=("FAIL  $name  (pytest collected no tests, see $OUT/$name.log)"); FAILED=1
  else
    SUMMARY+=("FAIL  $name  (exit $rc, ${dt}s, see $OUT/$name.log)"); FAILED=1
  fi
  return 0
}

step_info() {
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git rev-parse --abbrev-ref HEAD 2>/dev/null)"
  git status --short 2>/dev/null | head -20
  if [ "$HAVE_GPU" = 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "gpu: none ($GPU_WHY)"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v gcc >/dev/null && gcc --version | head -n 1
  echo "python: $PYTHON (set PYTHON=... to choose another)"
  "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
EOF
}

step_build() {
  export DBSAM_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  local key t0
  key=$("$PYTHON" benchmarks/build_key.py) || key=""
  # A second call on the same warm machine: the same sources and torch (build_key.py) reuse the
  # module and replay the first build's log (for the ptxas report). Otherwise from scratch: objects
  # left by another torch, or an incremental build that prints no ptxas report, must not be reused.
  if [ -n "$key" ] && [ "$(cat build/gpu_check.key 2>/dev/null)" = "$key" ] && [ -f build/gpu_check_build.log ] \
      && ls dbsam/_C*.so >/dev/null 2>&1; then
    echo "build: reusing the module built from these sources with this torch (key ${key:0:12}); its build log:"
    cat build/gpu_check_build.log
  else
    rm -rf build dbsam/_C*.so
    mkdir -p build
    t0=$(date +%s)
    MAX_JOBS=${MAX_JOBS:-16} "$PYTHON" setup.py build_ext --inplace 2>&1 | tee build/gpu_check_build.part
    [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
    mv build/gpu_check_build.part build/gpu_check_build.log
    [ -n "$key" ] && echo "$key" > build/gpu_check.key
    echo "build wall time: $(( $(date +%s) - t0 )) s (MAX_JOBS=${MAX_JOBS:-16}, archs $TORCH_CUDA_ARCH_LIST)"
  fi
  "$PYTHON" -c "import dbsam.ops._native as n; print('build_info:', n.BUILD_INFO); assert n.HAS_NATIVE_CUDA, n.LOAD_ERROR" || return 1
}

step_ptxas() {
  "$PYTHON" benchmarks/ptxas_report.py "$OUT/build.log" \
    --header "# ptxas -v of the ms_deform_attn kernels, from the build step of benchmarks/gpu_check.sh ($(git rev-parse --short HEAD 2>/dev/null))" \
    > "$OUT/ptxas_sm90.txt" && cat "$OUT/ptxas_sm90.txt" &&
  "$PYTHON" benchmarks/ptxas_report.py "$OUT/build.log" --match 5dbsam2ca \
    --header "# ptxas -v of the channel_attention kernels, from the build step of benchmarks/gpu_check.sh ($(git rev-parse --short HEAD 2>/dev/null))" \
    > "$OUT/ptxas_ca_sm90.txt"
}

# The CUDA kernel tests first, on their own: their result survives a slow rest of the suite.
# With pytest-xdist: 8 workers share the GPU (the tests are small), and a test that kills its
# process (the first run's segfault) is reported as a crashed worker instead of ending the step.
xdist() { "$PYTHON" -c "import xdist" >/dev/null 2>&1 && echo "-n 8"; }

step_tests_cuda() {
  # -rsP: the passed tests' output too (the lowp atomics' error figures are printed, not asserted).
  "$PYTHON" -m pytest tests/ops/test_ms_deform_attn_cuda.py -q -rsP $(xdist) --junitxml="$OUT/junit_cuda.xml" \
    -p no:cacheprovider
}

# Two CPU-only tests compile with inductor for a minute each (the step's critical path in run 5, 101 s
# in all); CI runs them on every push, so the GPU's time goes to the GPU cases. -rsP as above (the
# Triton lowp test prints its errors).
step_tests() {
  "$PYTHON" -m pytest tests/ops tests/model/test_vit_attention.py -q -rsP $(xdist) --ignore=tests/ops/test_ms_deform_attn_cuda.py \
    --deselect tests/ops/test_ms_deform_attn.py::test_op_compiles_with_inductor \
    --deselect "tests/ops/test_channel_attention.py::test_compile_fullgraph[cpu-inductor]" \
    --junitxml="$OUT/junit_ops.xml" -p no:cacheprovider
}

sanitizer() {  # sanitizer TOOL [TAG [ARGS...]]: TAG names the raw log of a second pass (another kernel variant)
  local tool=$1 tag=${2:-} san
  shift; [ $# -gt 0 ] && shift
  san=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  [ -x "$san" ] || { echo "compute-sanitizer not found"; return 1; }
  local raw="$OUT/$tool$tag.raw.log" rc
  # Unbuffered: a pass cut by its timeout still shows how far it got.
  PYTHONUNBUFFERED=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$PYTHON" benchmarks/sanitize_case.py "$@" >"$raw" 2>&1
  rc=$?
  cat "$raw"
  [ $rc -eq 0 ] || return 1
  # Belt and braces: the sanitizer's summary line must say 0 errors (memcheck prints "ERROR
  # SUMMARY: 0 errors", racecheck "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)").
  grep -Eq "ERROR SUMMARY: 0 errors|SUMMARY: 0 hazards displayed \(0 errors" "$raw" \
    || { echo "no summary line saying 0 errors"; return 1; }
}

# The default pass runs the MSDA forward that locates each point once per group (16-byte loads),
# the 8-byte atomic backward and the adapter at 8 bytes per thread (bf16: 4 channels, fp32: 2; a
# partial channel block at C = 24), its DW kernels at 1, 2 and 4 rows per thread (sanitize_case sets
# DBSAM_CA_ROWS itself; H = 7 leaves partial row tiles). The second pass (all read per process or per
# call) covers the per-lane MSDA forward at 8-byte loads, the opt-in bf16/fp16 grad_value atomics and
# the adapter at one channel per thread with the fused grad.
step_memcheck() { sanitizer memcheck && DBSAM_MSDA_LOAD_BYTES=8 DBSAM_MSDA_LOWP_ATOMICS=1 DBSAM_MSDA_FWD_BCAST=0 DBSAM_CA_VEC=1 DBSAM_CA_FUSED_GRAD=1 sanitizer memcheck _8B; }
# racecheck: our CUDA kernels only (sanitize_case.py --cuda-only says why); the second pass with one
# channel per thread in the adapter's kernels (their shared-memory row sums change with it).
step_racecheck() { sanitizer racecheck "" --cuda-only && DBSAM_CA_VEC=1 DBSAM_CA_FUSED_GRAD=1 sanitizer racecheck _vec1 --cuda-only; }

step_ab() { "$PYTHON" benchmarks/ab_order.py; }
step_exit_probe() { "$PYTHON" benchmarks/exit_probe.py --runs 4; }
step_profile() { "$PYTHON" benchmarks/profile_ops.py; }
step_profile_model() { "$PYTHON" benchmarks/profile_model.py; }
# Nsight Compute on one fwd+bwd of each op's own kernels (benchmarks/ncu_case.py): throughput, stall
# reasons, occupancy. --clock-control none: the card's clocks stay as they are.
step_ncu() {
  local ncu
  ncu=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
  [ -x "$ncu" ] || { echo "ncu not found"; return 1; }
  "$ncu" --clock-control none --target-processes all --launch-count 16 \
    --kernel-name regex:'msda_|dw_gelu|dw_backward|ln_stats|ln_backward|fold_kernel|grad_pre|gate_dot' \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis \
    "$PYTHON" benchmarks/ncu_case.py
}

bench() {  # bench NAME PYTEST-ARGS...
  local name=$1; shift
  "$PYTHON" -m pytest "$@" --benchmark-only --benchmark-json="$OUT/bench_$name.json" -q -p no:cacheprovider
}
# torch.compile of the reference compiles per shape and dtype (tens of seconds each): in bench_slow.
# Triton at its fixed launch config: autotuning every shape and dtype would compile ~10 configs per
# kernel (minutes); the tuned table is measured by bench_slow's sweep.
step_bench_msda() { DBSAM_TRITON_AUTOTUNE=0 bench msda benchmarks/test_ms_deform_attn.py -k "not reference_compiled"; }
step_bench_ca() { bench ca benchmarks/test_channel_attention.py -k "not max_autotune"; }
# #6's goal rows (the bf16 batch-2 training steps, with and without checkpointing) in a session and
# JSON of their own, first: a model step cut by the budget keeps them (see bench_slow below).
# The goal rows' -k expressions live beside the goals they serve (benchmarks/goals.py SELECT).
goal_rows() { "$PYTHON" benchmarks/goals.py --select "$1"; }
step_bench_model() {
  local rc=0 sel
  sel=$(goal_rows model_goal) || return 1
  bench model_goal benchmarks/test_model.py -k "$sel" || rc=1
  bench model benchmarks/test_model.py -k "not ($sel)" || rc=1
  return $rc
}
# pytest-benchmark writes its JSON when the session ends: one step that its timeout cuts keeps
# nothing. So four sessions, the goal's row first (#4: torch.compile max-autotune of the adapter at
# 8x64x64x768 bf16 fwd+bwd), each with its own file: a cut loses only the ones not yet finished.
step_bench_slow() {
  local rc=0 sel
  sel=$(goal_rows ca_compile_goal) || return 1
  bench slow_ca_goal benchmarks/test_channel_attention.py -k "$sel" || rc=1
  bench slow_msda benchmarks/test_ms_deform_attn.py -k "reference_compiled" || rc=1
  bench slow_tune benchmarks/test_ms_deform_attn_triton_tune.py || rc=1
  bench slow_ca benchmarks/test_channel_attention.py -k "max_autotune and not ($sel)" || rc=1
  return $rc
}

step_report() {
  ls "$OUT"/bench_*.json >/dev/null 2>&1 || { echo "no $OUT/bench_*.json (no bench step ran)"; return 1; }
  "$PYTHON" benchmarks/gpu_report.py "$OUT"/bench_*.json
  echo
  "$PYTHON" benchmarks/goals.py "$OUT"/bench_*.json  # each issue's goal: holds, misses, not measured
}

export -f xdist step_info step_build step_ptxas step_tests_cuda step_tests sanitizer step_memcheck step_racecheck step_ab step_exit_probe step_profile step_profile_model step_ncu \
  goal_rows bench step_bench_msda step_bench_ca step_bench_model step_bench_slow step_report
export HAVE_GPU GPU_WHY PYTHON OUT

run_step info 30 0 bash -c step_info
run_step build 150 0 bash -c step_build
run_step ptxas 15 0 bash -c step_ptxas
run_step tests_cuda 90 1 bash -c step_tests_cuda
run_step tests 120 0 bash -c step_tests
run_step memcheck 120 1 bash -c step_memcheck
run_step racecheck 90 1 bash -c step_racecheck
TAIL_LINES=5 run_step bench_msda 180 1 bash -c step_bench_msda
TAIL_LINES=5 run_step bench_ca 80 1 bash -c step_bench_ca
TAIL_LINES=5 run_step bench_model 210 1 bash -c step_bench_model
TAIL_LINES=60 run_step profile 60 1 bash -c step_profile
TAIL_LINES=50 run_step profile_model 100 1 bash -c step_profile_model
TAIL_LINES=5 run_step ncu 90 1 bash -c step_ncu
TAIL_LINES=12 run_step ab 110 1 bash -c step_ab
TAIL_LINES=5 run_step exit_probe 130 1 bash -c step_exit_probe
TAIL_LINES=5 run_step bench_slow 240 1 bash -c step_bench_slow
TAIL_LINES=200 run_step report 15 1 bash -c step_report

echo
echo "== summary ($(( $(date +%s) - START ))s, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
# GPU_CHECK_TAR=<file.tgz>: everything under $OUT in one archive (the device tool returns at most
# 8 files from its $OUT, and this run writes more).
if [ -n "${GPU_CHECK_TAR:-}" ]; then
  tar czf "$GPU_CHECK_TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed $OUT into $GPU_CHECK_TAR"
fi
exit $FAILED
