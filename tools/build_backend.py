"""An in-tree PEP 517 backend: setuptools, building against the environment's own torch.

Plain build isolation would install a fresh torch (possibly another version or CUDA flavour) into
a throwaway build environment, and the extension would then load against a torch it was not built
for. This backend keeps isolation for setuptools and wheel, but makes the *target* interpreter's
site-packages visible (appended, so the isolated build tools still win), so `import torch` in
setup.py finds exactly the torch that dbsam will run with. torch is therefore not a build
requirement: without it installed, setup.py stops with a message saying to install it first.
"""
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

_PROBE = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"


def _expose_target_torch():
    try:
        import torch  # noqa: F401  (already visible: --no-build-isolation or a plain setup.py run)
        return
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    if probe.returncode == 0 and probe.stdout.strip():
        site = probe.stdout.strip().splitlines()[-1]
        if site not in sys.path:
            sys.path.append(site)
            # setup.py may spawn compilers and Python helpers; they must see the same torch.
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), site]))


def _hook(name):
    def hook(*args, **kwargs):
        _expose_target_torch()
        return getattr(_setuptools, name)(*args, **kwargs)
    hook.__name__ = name
    return hook


for _name in ("get_requires_for_build_wheel", "get_requires_for_build_sdist", "get_requires_for_build_editable",
              "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable",
              "build_wheel", "build_sdist", "build_editable"):
    globals()[_name] = _hook(_name)
