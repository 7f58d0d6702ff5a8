"""Transformers integration: attention/mask functions, converted configs and models, `convert`, family registry.

Importing this package registers the `hf_lara` attention implementation and the built-in families (bert, roberta,
distilbert, gpt2, llama, mistral, qwen2, vit, deit) with `AutoConfig` and every applicable `AutoModel*` class.
"""

from .attention import ATTENTION_KEY, ESTIMATOR_ATTR, lara_attention_forward, lara_padding_mask, register_attention
from .cache import LaraCache, LaraStateLayer
from .config import LaraConfig
from .convert import convert
from .families import register_builtin_families, register_family
from .models import LaraModelMixin
from .registry import FAMILIES, supported_families

register_attention()
register_builtin_families()

__all__ = [
    "ATTENTION_KEY",
    "ESTIMATOR_ATTR",
    "FAMILIES",
    "LaraCache",
    "LaraConfig",
    "LaraModelMixin",
    "LaraStateLayer",
    "convert",
    "lara_attention_forward",
    "lara_padding_mask",
    "register_family",
    "supported_families",
]
