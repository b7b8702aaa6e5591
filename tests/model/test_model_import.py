"""`import dbsam` works without segment_anything; the model names load it lazily."""
import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'segment_anything':
            raise ModuleNotFoundError("No module named 'segment_anything'")
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_import_dbsam_without_segment_anything():
    out = run("import dbsam, dbsam.ops; print(dbsam.__version__, 'segment_anything' in sys.modules)\n"
              "try:\n    dbsam.dbsam_model_registry\nexcept ImportError as e:\n    print('ERR', e)")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.endswith("False")
    assert "pip install segment-anything" in second


def test_lazy_names():
    import dbsam
    from dbsam.model import build, dbsam_model_registry

    assert dbsam.dbsam_model_registry is dbsam_model_registry is build.dbsam_model_registry
    assert set(dbsam_model_registry) == {"vit_b", "vit_l", "vit_h", "tiny", "default"}
