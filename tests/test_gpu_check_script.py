"""The benchmark tools without a GPU. gpu_check.sh: the steps that need one say so, the rest run, and
the archive option packs the logs (the GPU steps themselves run only on a GPU machine); exit_probe.py
and saved_activations.py run on the CPU."""
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
from _paths import REPO, import_from


CHECK_GPU_STEPS = ["tests_cuda", "memcheck", "racecheck", "bench_msda", "bench_ca", "bench_model"]
DIAGNOSTIC_STEPS = ["profile", "profile_model", "ncu", "ab", "exit_probe", "bench_slow"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
@pytest.mark.parametrize("mode", [None, "full"])
def test_gpu_check_without_a_gpu(tmp_path, mode):
    out, tgz = tmp_path / "out", tmp_path / "gc.tgz"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_TAR=str(tgz),
               GPU_CHECK_SKIP="build ptxas tests", PATH="/usr/bin:/bin")  # no nvidia-smi on PATH
    env.pop("GPU_CHECK_MODE", None)
    if mode:
        env["GPU_CHECK_MODE"] = mode
    res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("PASS  info"), summary
    assert "SKIP  build  (GPU_CHECK_SKIP)" in summary
    gpu_steps = [line.split()[1] for line in summary if "needs a GPU" in line]
    diagnostics = [line.split()[1] for line in summary if "GPU_CHECK_MODE=full runs it" in line]
    if mode == "full":  # the diagnostics after the check, in that order
        assert gpu_steps == CHECK_GPU_STEPS + DIAGNOSTIC_STEPS + ["report"], summary
        assert diagnostics == []
    else:  # the default: the check alone (under 8 minutes on an H100)
        assert gpu_steps == CHECK_GPU_STEPS + ["report"], summary
        assert diagnostics == DIAGNOSTIC_STEPS, summary
    assert "torch" in (out / "info.log").read_text()
    with tarfile.open(tgz) as tar:
        assert "out/summary.txt" in tar.getnames()


def test_gpu_check_refuses_an_unknown_mode(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_MODE="everything")
    res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "GPU_CHECK_MODE must be core or full" in res.stderr


def test_exit_probe_runs_on_the_cpu():
    # Its GPU verdicts matter; here only that every setting's child runs and exits 0.
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "exit_probe.py"), "--runs", "1",
                          "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("exit_probe")]
    assert len(lines) == 5, res.stdout
    # ops_only says "skip: no native cpu kernels" in a pure-Python install; the others always run.
    assert all("0 of 1 exited abnormally" in line or ": skip: no native" in line for line in lines), res.stdout
    assert sum("0 of 1 exited abnormally" in line for line in lines) >= 4, res.stdout


def test_saved_activations_runs_on_the_cpu():
    pytest.importorskip("segment_anything")
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "saved_activations.py"), "--variant", "tiny"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().startswith("ops ")]
    assert [(r[1], r[4]) for r in rows] == [("reference", "sam"), ("auto", "sdpa"), ("auto", "sam")], res.stdout
    assert all(float(r[5]) > 0 for r in rows), res.stdout


def _goals():
    return import_from("benchmarks", "goals")


def _msda_row(mode, shape, dtype, backend, median, pct=None):
    name = f"test_{'forward_backward' if mode == 'fwd_bwd' else 'forward'}[{shape}-N8-{dtype}-{backend}]"
    return {"name": name, "params": {"name": shape, "N": 8, "dtype": dtype, "locality": "model", "backend": backend},
            "stats": {"median": median}, "extra_info": {} if pct is None else {"pct_of_copy": pct}}


def test_goals_verdicts_from_synthetic_rows():
    goals = _goals()
    shape = "vitadapter_injector"
    rows = [
        _msda_row("fwd", shape, "bfloat16", "cuda", 1e-4, pct=55.0),          # >= 50%: holds
        _msda_row("fwd", shape, "float32", "cuda", 1e-4, pct=49.9),           # misses
        _msda_row("fwd_bwd", shape, "bfloat16", "cuda", 1.0e-3),
        _msda_row("fwd_bwd", shape, "bfloat16", "deformops", 1.6e-3),         # 1.6x: holds
        _msda_row("fwd_bwd", shape, "bfloat16", "reference", 9.0e-3),         # 9x: misses
        _msda_row("fwd_bwd", shape, "bfloat16", "triton", 1.4e-3),            # 1.4x CUDA's time: misses
        {"name": "test_channel_attention[8x64x64x768-bfloat16-fwd_bwd-cuda]", "stats": {"median": 1.0e-3},
         "extra_info": {"saved_activation_bytes": 50}},
        {"name": "test_channel_attention[8x64x64x768-bfloat16-fwd_bwd-eager_nchw]", "stats": {"median": 2.6e-3},
         "extra_info": {"saved_activation_bytes": 202}},
        {"name": "t", "group": "vit_b train step batch 2 bf16", "params": {"backend": "auto"},
         "stats": {"median": 0.10}, "extra_info": {"peak_memory_MiB": 6000.0, "allocated_at_start_MiB": 400.0}},
        {"name": "t", "group": "vit_b train step batch 2 bf16", "params": {"backend": "reference"},
         "stats": {"median": 0.12}, "extra_info": {"peak_memory_MiB": 9000.0, "allocated_at_start_MiB": 410.0}},
        {"name": "t", "group": "vit_b train step batch 2 bf16 grad-ckpt", "params": {"backend": "auto"},
         "stats": {"median": 0.15}, "extra_info": {"peak_memory_MiB": 15300.0, "allocated_at_start_MiB": 400.0}},
    ]
    verdict = {what: holds for _, what, _, _, holds in goals.evaluate(rows).lines}
    assert verdict[f"fwd % of copy, {shape} N8 bfloat16"] is True
    assert verdict[f"fwd % of copy, {shape} N8 float32"] is False
    assert verdict[f"fwd+bwd vs deformops, {shape} N8 bfloat16"] is True
    assert verdict[f"fwd+bwd vs reference, {shape} N8 bfloat16"] is False
    assert verdict[f"fwd_bwd triton/cuda time, {shape} N8 bfloat16"] is False
    assert verdict[f"fwd_bwd vs deformops, {shape} N8 bfloat16"] is True   # triton 1.4 ms vs deformops 1.6 ms
    assert verdict[f"fwd+bwd vs deformops, {shape} N8 float32"] is None    # not measured
    assert verdict["adapter fwd+bwd vs eager NCHW, 8x64x64x768 bf16"] is True
    assert verdict["adapter saved activations / eager NCHW's"] is True
    assert verdict["adapter fwd+bwd vs torch.compile max-autotune"] is None
    assert verdict["train step bf16 batch 2: reference time / fast"] is False  # 1.2x
    assert verdict["train step bf16 batch 2: peak memory fast / reference"] is True  # 0.67x
    assert verdict["batch 2 bf16 with grad checkpointing: peak memory"] is False  # 15300 MiB > 16e9 bytes
    # A peak counts only where the rows say they started from the same memory (run 5's did not).
    for start in (None, 4000.0):
        info = rows[-2]["extra_info"]
        info.pop("allocated_at_start_MiB", None)
        if start is not None:
            info["allocated_at_start_MiB"] = start
        verdict = {what: holds for _, what, _, _, holds in goals.evaluate(rows).lines}
        assert verdict["train step bf16 batch 2: peak memory fast / reference"] is None, start
        assert verdict["train step bf16 batch 2: reference time / fast"] is False


def test_goals_reads_a_committed_gpu_run():
    run = os.path.join(REPO, "benchmarks", "results", "h100_2026-11-27_10030cd")
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "goals.py"),
                          os.path.join(run, "bench_msda.json"), os.path.join(run, "bench_ca.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    measured = int(last.split(" of ")[1].split()[0])
    assert measured >= 50, last  # run 3 timed every MSDA shape with its peers, and the adapter


def test_build_key_follows_what_the_build_reads(tmp_path, monkeypatch):
    # gpu_check.sh reuses a module on a second call only while this key is unchanged.
    build_key = import_from("benchmarks", "build_key").build_key
    repo = tmp_path / "repo"
    (repo / "csrc" / "op").mkdir(parents=True)
    (repo / "setup.py").write_text("setup()\n")
    (repo / "csrc" / "op" / "k.cu").write_text("__global__ void k() {}\n")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    key = build_key(str(repo))
    assert build_key(str(repo)) == key
    os.utime(repo / "csrc" / "op" / "k.cu", (1, 1))  # a fresh copy's times alone: same key
    assert build_key(str(repo)) == key
    (repo / "csrc" / "op" / "k.cu").write_text("__global__ void k() { }\n")
    changed = build_key(str(repo))
    assert changed != key
    (repo / "csrc" / "op" / "new.h").write_text("")
    with_header = build_key(str(repo))
    assert with_header != changed
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert build_key(str(repo)) != with_header


def test_gpu_check_deselects_tests_that_exist():
    # The tests step leaves out CPU-only minute-long compiles by node id: a renamed test would
    # silently come back into the GPU's eight minutes.
    import shlex

    with open(os.path.join(REPO, "benchmarks", "gpu_check.sh")) as f:
        ids = [shlex.split(m)[0] for m in re.findall(r"--deselect (\S+)", f.read())]
    assert ids
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *ids],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"{len(ids)} tests collected" in res.stdout, res.stdout[-2000:]


def test_profile_ops_host_table_on_the_cpu(capsys):
    # The host-time table runs on any device (the GPU run reads it for the adapter and MSDA at B = 1).
    # profile_ops imports the benchmarks' conftest, a name the tests' own conftest holds here.
    tests_conftest = sys.modules.pop("conftest", None)
    try:
        profile_ops = import_from("benchmarks", "profile_ops")
    finally:
        sys.modules.pop("conftest", None)
        if tests_conftest is not None:
            sys.modules["conftest"] = tests_conftest
    import torch

    x = torch.randn(64, 64, requires_grad=True)
    profile_ops.print_host_ops(lambda: torch.autograd.grad((x @ x).relu().sum(), [x]), reps=2,
                               sync=lambda: None)
    lines = [line for line in capsys.readouterr().out.splitlines() if "[host]" in line]
    assert "self CPU time per step" in lines[0]
    assert any("aten::mm" in line for line in lines[1:]), lines


def test_profile_model_kinds_and_cpu_table():
    # Kernel names as run 6's profile printed them (H200, CUDA 13, torch 2.11, Triton 3.6).
    kind_of = import_from("benchmarks", "profile_model").kind_of
    names = {"void dbsam::ca::dw_backward_kernel<c10::BFloat16, float, 4, false, 2>(float const*)": "dbsam ops",
             "_msda_bwd_kernel": "dbsam ops",
             "nvjet_sm90_tst_256x128_64x4_1x2_h_badd_coopA_TNT": "gemm",
             "void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>(cutlass_80_simt)": "gemm",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)": "attention",
             "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>": "normalisation",
             "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<float>>": "copy / cat / pad",
             "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<>>": "elementwise",
             "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<4>>": "optimizer",
             "dgrad2d_c1_k1_nhwc_specialized": "convolution", "aten::mm": "gemm"}
    assert {n: kind_of(n) for n in names} == names
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "profile_model.py"), "--rows", "auto"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("== tiny train step batch 2 bfloat16 auto"), lines[:3]
    assert "CPU ops (self time) per step" in lines[1] and any(" dbsam ops " in line for line in lines)


def _gpu_report(tmp_path, rows):
    """gpu_report.py's output lines for a JSON file of these benchmark rows."""
    import json

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"benchmarks": rows}))
    res = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_report.py"), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_gpu_report_shows_what_a_row_left_behind(tmp_path):
    rows = [{"name": "t", "group": "vit_b train step batch 2 bf16", "params": {"backend": b},
             "stats": {"median": m}, "extra_info": {"peak_memory_MiB": p, "allocated_at_start_MiB": 400.0,
                                                    "left_behind_MiB": left}}
            for b, m, p, left in (("auto", 0.1, 6000.0, 0.0), ("reference", 0.16, 16000.0, 12653.2))]
    lines = _gpu_report(tmp_path, rows)
    assert lines[1].split()[-1] == "left_MiB"
    ref_row = next(line for line in lines if " reference " in line)
    assert ref_row.split()[-1] == "12653.2" and "0.38x" not in ref_row and "1.00x" in ref_row


def test_gpu_report_shows_host_time_and_op_counts(tmp_path):
    # test_model.py records a step's host time and its ATen op count (op_count.py) in extra_info.
    rows = [{"name": "t", "group": "vit_b train step batch 2 bf16", "params": {"backend": b},
             "stats": {"median": m}, "extra_info": {"host_us": host, "aten_ops_per_step": ops}}
            for b, m, host, ops in (("auto", 0.1, 93000.0, 6763), ("reference", 0.16, 98000.0, 7151))]
    lines = _gpu_report(tmp_path, rows)
    assert lines[1].split()[-2:] == ["host_us", "ops"]
    auto = next(line for line in lines if " auto " in line).split()
    assert auto[-2:] == ["93000.0", "6763"]


def test_gpu_report_ab_table_of_the_variants(tmp_path):
    # The A/B rows (cuda_<variant>) against the default cuda row of each group, as time ratios.
    def row(impl, median):
        return {"name": f"test_channel_attention[8x64x64x768-bfloat16-fwd_bwd-{impl}]", "params": {"impl": impl},
                "stats": {"median": median}}

    rows = [row("cuda", 2.0e-3), row("cuda_rows2", 1.5e-3), row("cuda_vec2", 2.2e-3), row("eager_nchw", 3.0e-3)]
    lines = _gpu_report(tmp_path, rows)
    head = lines.index("A/B: variant time / default (cuda) time, < 1 faster")
    assert lines[head + 1].split()[-2:] == ["rows2", "vec2"]
    assert lines[head + 2].split()[-3:] == ["2000.0", "0.75", "1.10"]


def test_goal_selections_pick_the_goal_rows():
    # gpu_check runs each goal's rows first, by goals.SELECT's -k expressions: they must select the
    # rows goals.py reads. #6: the bf16 batch-2 training steps, fast and reference, with and without
    # checkpointing (collected on the CPU too; they skip there). #4's compile row exists at the GPU
    # shape only: its expression must match the benchmark id that ca_table files under the goal's key.
    goals = _goals()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                          "benchmarks/test_model.py", "-k", goals.SELECT["model_goal"]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    ids = set(re.findall(r"test_vit_b_train_step\[([^\]]+)\]", res.stdout))
    assert {"2-bf16-no_ckpt-auto", "2-bf16-no_ckpt-reference", "2-bf16-grad_ckpt-auto",
            "2-bf16-grad_ckpt-reference"} <= ids, res.stdout[-2000:]
    assert all(i.startswith("2-bf16-") for i in ids)
    name = "test_channel_attention[8x64x64x768-bfloat16-fwd_bwd-compile_max_autotune]"
    assert goals.ca_table([{"name": name, "stats": {"median": 1.0}}]) == {
        ("8x64x64x768", "bfloat16", "fwd_bwd", "compile_max_autotune"): {"median": 1.0, "saved": None}}
    words = [w for w in goals.SELECT["ca_compile_goal"].split() if w not in ("and", "or", "not")]
    assert words and all(w in name for w in words)
