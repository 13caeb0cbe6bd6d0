"""Models for the engine: a paged forward over HF Llama-family models, and how to load them."""

from engine.models.llama import SUPPORTED_ARCHITECTURES, PagedCausalLM
from engine.models.presets import (
    PRESETS,
    LoadedModel,
    ModelShape,
    load_model,
    load_tokenizer,
    model_config,
    model_limits,
    model_shape,
)
from engine.models.tokenizer import ByteTokenizer

__all__ = [
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "ByteTokenizer",
    "LoadedModel",
    "ModelShape",
    "PagedCausalLM",
    "load_model",
    "load_tokenizer",
    "model_config",
    "model_limits",
    "model_shape",
]
