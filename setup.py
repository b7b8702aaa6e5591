"""Builds dbsam._C, the native kernels, against the torch installed in this environment.

CPU kernels are always built. CUDA kernels are built when torch sees a GPU, or when
DBSAM_FORCE_CUDA=1 (CI and GPU-less build hosts); DBSAM_FORCE_CUDA=0 turns them off.
TORCH_CUDA_ARCH_LIST picks the architectures (default "8.0;9.0"); MAX_JOBS the parallel
compile jobs (default: all cores).
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def _locate_cuda_home() -> None:
    """torch guesses the toolkit from `which nvcc`; a wrapper script on PATH (/usr/local/bin/nvcc)
    then yields /usr/local and the link fails for want of libcudart. Prefer a real toolkit folder
    when the user has not named one."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


_locate_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised by hand, see README
    sys.exit(
        "dbsam compiles its kernels against the torch of the environment it is installed into, "
        f"and torch could not be imported ({exc}). Install torch first (pip install torch), then "
        "run `pip install .` again."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("DBSAM_FORCE_CUDA", "").strip()
    if forced == "0":
        return False
    if torch.version.cuda is None:
        if forced == "1":
            sys.exit("DBSAM_FORCE_CUDA=1 but this torch is a CPU-only build: install a CUDA torch.")
        return False
    if CUDA_HOME is None:
        if forced == "1":
            sys.exit("DBSAM_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME.")
        return False
    return forced == "1" or torch.cuda.is_available()


def nvidia_wheel_includes() -> list:
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that CUDA-13 wheels ship under
    site-packages/nvidia/cu13/include rather than in the toolkit."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/ops.cpp") + rel("csrc/*/cpu.cpp") + rel("csrc/*/autograd.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3"]
    define_macros = []
    if not want_cuda():
        return [CppExtension("dbsam._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [])]
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    define_macros += [("DBSAM_WITH_CUDA", None), ("DBSAM_CUDA_ARCHS", '"' + archs.replace(" ", "") + '"')]
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-Xptxas=-warn-spills", "-Xptxas=-v"]
    return [CUDAExtension(
        "dbsam._C",
        sources + rel("csrc/*/cuda.cu"),
        include_dirs=include_dirs + nvidia_wheel_includes(),
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
    )]


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    packages=find_packages(include=["dbsam", "dbsam.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
