"""skd: structured knowledge distillation for semantic segmentation, with cached teacher outputs."""

__version__ = "0.1.0"
