"""dbsam: DB-SAM for medical image segmentation and its two fused ops."""

__version__ = "0.1.0"
