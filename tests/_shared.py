"""Skip conditions and guards that tests in several folders share (pytest puts tests/ on sys.path
through tests/conftest.py, so any test file can import this)."""
import contextlib
import importlib.util

import pytest
import torch

ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
ONNX_MISSING = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
# The ONNX export tests: onnx and onnxscript write the file, onnxruntime runs it.
needs_onnx = pytest.mark.skipif(bool(ONNX_MISSING),
                                reason=f"needs {', '.join(ONNX_MISSING)} (the onnx and test extras)")


@contextlib.contextmanager
def no_host_sync():
    """Any CUDA call in the block that makes the host wait for the GPU raises (torch's sync debug
    mode 'error'): a host-bound op must never sync, or it costs the whole queue. Restores the mode."""
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)
