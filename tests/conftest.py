"""Set-up shared by every test folder.

Triton compiles its own library functions (tl.sum, tl.cdiv, ...) for the interpreter mode in force
when triton is first imported, so compiled and interpreted kernels cannot share a process. On a host
without CUDA the Triton kernels can only run interpreted: import triton in that mode here, before
any test module (or torch.compile) imports it, then restore the environment so that nothing else
sees the variable. Tests that run Triton kernels on CPU tensors set it again for their own duration with the
`triton_interpreter` fixture.
"""
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass  # no triton (the CPU-only torch): the Triton tests skip and say so
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for one test on a host without CUDA, where Triton kernels of CPU tensors
    can only run interpreted (the backends' availability checks read the variable)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled_triton():
    """run(script) -> stdout: the script in a fresh process with Triton in compiled mode (no
    TRITON_INTERPRET; the in-tree package first on the path), for compiling kernels ahead of time
    without a GPU (Triton bundles ptxas). Skips where this Triton has no ptxas; fails on any error."""
    def run(script: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([REPO, *sys.path])
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        if res.returncode != 0 and "ptxas" in res.stderr and "No such file" in res.stderr:
            pytest.skip("no ptxas in this triton install")
        assert res.returncode == 0, res.stdout + res.stderr[-5000:]
        return res.stdout

    return run
