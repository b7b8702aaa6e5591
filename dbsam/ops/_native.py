"""Loads dbsam._C (the compiled kernels) once and remembers why it failed, if it did."""
import torch

try:
    from dbsam import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)

    BUILD_INFO = torch.ops.dbsam.build_info()
    LOAD_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol from a torch it was not built for
    BUILD_INFO = ""
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

HAS_NATIVE = LOAD_ERROR is None
HAS_NATIVE_CUDA = HAS_NATIVE and "cuda" in BUILD_INFO.split(";")[0].split(",")


def native_reason(device_type: str) -> str:
    """Why the native kernels cannot run on `device_type`, or '' when they can."""
    if not HAS_NATIVE:
        return f"the native extension dbsam._C is not importable ({LOAD_ERROR}); reinstall with `pip install .`"
    if device_type == "cuda" and not HAS_NATIVE_CUDA:
        return "dbsam._C was built without CUDA kernels (no GPU and DBSAM_FORCE_CUDA unset at build time)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return ""


def backend_reason(backend: str, device) -> str:
    """Why the native `backend` ("cpu" or "cuda") cannot run on tensors of `device`, or ''."""
    if device.type != backend:
        return f"the {backend} backend runs {backend.upper()} tensors only"
    return native_reason(device.type)


def has_cpp_autograd(qualname: str) -> bool:
    """Whether the native op `qualname` has its autograd kernel in dbsam._C (csrc/*/autograd.cpp)."""
    return HAS_NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")
