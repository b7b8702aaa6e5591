"""Set-up shared by every test folder.

Triton compiles its own library functions (tl.sum, tl.cdiv, ...) for the interpreter mode in force
when triton is first imported, so compiled and interpreted kernels cannot share a process. On a host
without CUDA the Triton kernels can only run interpreted: import triton in that mode here, before
any test module (or torch.compile) imports it, then restore the environment so that nothing else
sees the variable. Tests that run Triton kernels on CPU tensors set it again for their own duration with the
`triton_interpreter` fixture.
"""
import os

import pytest
import torch

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
