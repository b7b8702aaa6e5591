"""`python -m dbsam.ops`: what is built, what is available on each device, and what auto picks."""
from . import _native, report


def info() -> str:
    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}); "
             f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}"]
    if _native.HAS_NATIVE:
        lines.append(f"dbsam._C built with: {_native.BUILD_INFO}")
    else:
        lines.append(f"dbsam._C not loaded: {_native.LOAD_ERROR}")
    lines.append(report())
    return "\n".join(lines)


if __name__ == "__main__":
    print(info())
