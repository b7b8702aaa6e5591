"""Set-up shared by every test folder.

Triton compiles its own library functions (tl.sum, tl.cdiv, ...) for the interpreter mode in force
when triton is first imported, so compiled and interpreted kernels cannot share a process. On a host
without CUDA the Triton kernels can only run interpreted: import triton in that mode here, before
any test module (or torch.compile) imports it, then restore the environment so that nothing else
sees the variable. The Triton test modules set it again around their own tests.
"""
import os

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
