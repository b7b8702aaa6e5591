"""dbsam.model: DB-SAM on segment_anything's SAM parts (see docs/model.md)."""
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
