"""Pure-PyTorch attention estimators (no transformers import). See README.md beside this file for the maths."""

from . import eva, kernel, lara, ra, rfa, softmax  # noqa: F401  (importing registers the estimators)
from .base import AttentionEstimator, available_methods, build_attention, register_estimator

__all__ = ["AttentionEstimator", "available_methods", "build_attention", "register_estimator"]
