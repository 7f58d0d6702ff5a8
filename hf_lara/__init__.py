"""hf_lara: linear-complexity randomized attention for pretrained HuggingFace Transformers models."""

from .attention import AttentionEstimator, available_methods, build_attention, register_estimator
from .integration import LaraCache, LaraConfig, LaraModelMixin, convert, register_family, supported_families
from .integration.config import (
    LaraBertConfig,
    LaraDeiTConfig,
    LaraDistilBertConfig,
    LaraGPT2Config,
    LaraLlamaConfig,
    LaraMistralConfig,
    LaraQwen2Config,
    LaraRobertaConfig,
    LaraViTConfig,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionEstimator",
    "LaraBertConfig",
    "LaraCache",
    "LaraConfig",
    "LaraDeiTConfig",
    "LaraDistilBertConfig",
    "LaraGPT2Config",
    "LaraLlamaConfig",
    "LaraMistralConfig",
    "LaraModelMixin",
    "LaraQwen2Config",
    "LaraRobertaConfig",
    "LaraViTConfig",
    "__version__",
    "available_methods",
    "build_attention",
    "convert",
    "register_estimator",
    "register_family",
    "supported_families",
]
