"""dbsam: DB-SAM for medical image segmentation and its two fused ops.

    from dbsam import dbsam_model_registry     # needs segment_anything (imported on first use)
    model = dbsam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")
"""

__version__ = "0.1.0"

_MODEL_NAMES = ("dbsam_model_registry", "DBSAM", "DBSAMConfig", "DBSAMPredictor", "build_dbsam", "load_dbsam",
                "save_dbsam")

__all__ = ["__version__", *_MODEL_NAMES]


def __getattr__(name):
    # Lazy: `import dbsam` (and dbsam.ops) works without segment_anything installed.
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'dbsam' has no attribute {name!r}")
