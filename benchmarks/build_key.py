"""Prints a key for the extension build gpu_check.sh makes: the torch and CUDA versions, the target
architectures and the bytes of every file the build reads (setup.py, CMakeLists.txt, csrc/).

The device tool copies the working tree afresh for every call, so file times change and an
incremental build recompiles everything (H100 run 5: 48 s of a 900 s lease for a second call on
the same machine with the same sources). gpu_check.sh reuses a module whose key matches.

    python benchmarks/build_key.py
"""
import hashlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_key(repo: str = REPO) -> str:
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                 os.environ.get("DBSAM_FORCE_CUDA", ""), sys.version):
        h.update(part.encode() + b"\0")
    files = [os.path.join(repo, name) for name in ("setup.py", "CMakeLists.txt")]
    for root, dirs, names in os.walk(os.path.join(repo, "csrc")):
        dirs.sort()
        files += [os.path.join(root, name) for name in sorted(names)]
    for path in files:
        if os.path.isfile(path):
            h.update(os.path.relpath(path, repo).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


if __name__ == "__main__":
    print(build_key())
