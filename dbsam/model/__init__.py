"""dbsam.model: DB-SAM on segment_anything's SAM parts (see docs/model.md)."""
try:
    import segment_anything  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by tests/model/test_model_import.py
    raise ImportError("dbsam.model builds on Meta's segment-anything package, which is not installed: "
                      "pip install segment-anything (or pip install 'dbsam[model]')") from exc

from .build import (CheckpointError, build_dbsam, dbsam_model_registry, load_dbsam, load_sam_weights,
                    read_sam_checkpoint, save_dbsam)
from .config import VARIANTS, DBSAMConfig
from .dbsam import DBSAM
from .predictor import DBSAMPredictor, Prediction

__all__ = [
    "CheckpointError",
    "DBSAM",
    "DBSAMConfig",
    "DBSAMPredictor",
    "Prediction",
    "VARIANTS",
    "build_dbsam",
    "dbsam_model_registry",
    "load_dbsam",
    "load_sam_weights",
    "read_sam_checkpoint",
    "save_dbsam",
]
