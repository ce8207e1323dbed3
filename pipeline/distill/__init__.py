"""Distillation losses for semantic segmentation."""
