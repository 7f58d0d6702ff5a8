"""hf_lara: linear-complexity randomized attention for pretrained HuggingFace Transformers models."""

from .attention import AttentionEstimator, available_methods, build_attention, register_estimator

__version__ = "0.1.0"

__all__ = ["AttentionEstimator", "available_methods", "build_attention", "register_estimator", "__version__"]
