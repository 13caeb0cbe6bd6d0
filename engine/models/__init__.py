"""Models for the engine: a paged forward over HF Llama-family models, and how to load them."""

from engine.models.llama import SUPPORTED_ARCHITECTURES, PagedCausalLM
from engine.models.presets import PRESETS, LoadedModel, load_model, model_limits
from engine.models.tokenizer import ByteTokenizer

__all__ = [
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "ByteTokenizer",
    "LoadedModel",
    "PagedCausalLM",
    "load_model",
    "model_limits",
]
