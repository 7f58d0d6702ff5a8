"""The public names the integration adds to `hf_lara`."""

from __future__ import annotations

import hf_lara

INTEGRATION_EXPORTS = {
    "LaraConfig", "LaraModelMixin", "convert", "register_family", "supported_families",
    "LaraBertConfig", "LaraRobertaConfig", "LaraDistilBertConfig", "LaraGPT2Config", "LaraLlamaConfig",
    "LaraMistralConfig", "LaraQwen2Config", "LaraViTConfig", "LaraDeiTConfig",
}  # fmt: skip


def test_integration_exports():
    assert INTEGRATION_EXPORTS <= set(hf_lara.__all__)
    assert all(hasattr(hf_lara, name) for name in hf_lara.__all__)
    assert {"AttentionEstimator", "available_methods", "build_attention", "register_estimator"} <= set(hf_lara.__all__)
