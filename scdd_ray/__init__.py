"""scdd-ray: Ray-distributed SC-DD (Self-supervised Compression for Dataset Distillation)."""

__version__ = "0.1.0"
