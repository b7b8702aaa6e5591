"""The benchmark tools without a GPU. gpu_check.sh: the steps that need one say so, the rest run, and
the archive option packs the logs (the GPU steps themselves run only on a GPU machine); exit_probe.py
and saved_activations.py run on the CPU."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_gpu_check_without_a_gpu(tmp_path):
    out, tgz = tmp_path / "out", tmp_path / "gc.tgz"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_TAR=str(tgz),
               GPU_CHECK_SKIP="build ptxas tests", PATH="/usr/bin:/bin")  # no nvidia-smi on PATH
    res = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("PASS  info"), summary
    assert "SKIP  build  (GPU_CHECK_SKIP)" in summary
    gpu_steps = [line.split()[1] for line in summary if "needs a GPU" in line]
    assert gpu_steps == ["tests_cuda", "memcheck", "racecheck", "bench_msda", "bench_ca", "profile", "ncu", "ab",
                         "exit_probe", "bench_model", "bench_slow", "report"], summary
    assert "torch" in (out / "info.log").read_text()
    with tarfile.open(tgz) as tar:
        assert "out/summary.txt" in tar.getnames()


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
