"""Model loading: named presets with seeded random weights, local checkpoints, or a model object.

No model hub is reachable, so every test and benchmark runs on a preset: a ``transformers``
config built here, instantiated with seeded random weights directly on the target device and
dtype (an 8B preset is never materialised in fp32 on the CPU first).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.models.tokenizer import ByteTokenizer

# Large enough that a random model's outputs depend on the prompt and on attention (with HF's
# 0.02 a random tiny model repeats one token, and a broken attention would go unnoticed).
TINY_INIT_RANGE = 0.25

_SPECIAL_TOKENS: dict[str, int] = {
    "pad_token_id": ByteTokenizer.pad_token_id,
    "bos_token_id": ByteTokenizer.bos_token_id,
    "eos_token_id": ByteTokenizer.eos_token_id,
}
_TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": TINY_INIT_RANGE,
    **_SPECIAL_TOKENS,
}


@dataclass(frozen=True)
class Preset:
    """A named model: its config, its HF class, and whether biases/norms are randomised too."""

    make_config: Callable[[], PretrainedConfig]
    model_class: type[PreTrainedModel]
    # HF zero-inits biases and sets RMSNorm weights to 1, which would leave those paths
    # untested; tiny (test) presets randomise them.
    randomize_biases_and_norms: bool
    description: str


def _llama_1b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        initializer_range=0.02,
        **_SPECIAL_TOKENS,
    )


def _llama_8b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
        initializer_range=0.02,
        **_SPECIAL_TOKENS,
    )


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "llama-tiny": Preset(
            lambda: LlamaConfig(**_TINY_SHAPE), LlamaForCausalLM, True, "tiny Llama"
        ),
        "qwen2-tiny": Preset(
            lambda: Qwen2Config(**_TINY_SHAPE), Qwen2ForCausalLM, True, "tiny Qwen2 (qkv bias)"
        ),
        "qwen3-tiny": Preset(
            # head_dim 32 != hidden / heads (16): exercises an explicit head_dim.
            lambda: Qwen3Config(**_TINY_SHAPE, head_dim=32),
            Qwen3ForCausalLM,
            True,
            "tiny Qwen3 (q/k norm, explicit head_dim)",
        ),
        "mistral-tiny": Preset(
            lambda: MistralConfig(**_TINY_SHAPE, sliding_window=None),
            MistralForCausalLM,
            True,
            "tiny Mistral (no sliding window)",
        ),
        "llama-1b": Preset(_llama_1b, LlamaForCausalLM, False, "Llama-3.2-1B shape"),
        "llama-8b": Preset(_llama_8b, LlamaForCausalLM, False, "Llama-3-8B shape"),
    }
)


@dataclass
class LoadedModel:
    """An HF causal LM in eval mode on its device and dtype, with its tokenizer.

    ``tokenizer`` is a ``ByteTokenizer`` for presets, the checkpoint's ``AutoTokenizer`` for a
    local directory, and None for a model object passed in.
    """

    name: str
    hf_model: PreTrainedModel
    tokenizer: Any
    max_seq_len: int


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def _randomize_biases_and_norms(model: nn.Module, std: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.normal_(0.0, std)
        elif type(module).__name__.endswith("RMSNorm"):
            module.weight.normal_(1.0, std)


def build_preset(name: str, *, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Instantiate preset ``name`` with weights drawn from ``seed``, on ``device`` in ``dtype``.

    The global RNG state is left untouched. Raises ``ValueError`` for an unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    config = preset.make_config()
    # Fork the RNG of the device the weights are drawn on, so seeding here leaves the caller's
    # random streams as they were.
    rng_devices: list[int] = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), _default_dtype(dtype):
        torch.manual_seed(seed)
        model = preset.model_class(config)
        if preset.randomize_biases_and_norms:
            _randomize_biases_and_norms(model, config.initializer_range)
    return model


def _load_checkpoint(path: Path, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model checkpoint directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{path}: no loadable tokenizer ({error})") from error
    kwargs: dict[str, Any] = {}
    # Without accelerate, transformers refuses device_map: load on the CPU, then move.
    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(device)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, **kwargs
    )
    return _finish(str(path), hf_model, tokenizer, device, dtype)


def _finish(
    name: str, hf_model: nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        name=name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        max_seq_len=int(hf_model.config.max_position_embeddings),
    )


def load_model(
    model: str | os.PathLike[str] | PreTrainedModel,
    *,
    device: str | torch.device,
    dtype: torch.dtype | str,
    seed: int = 0,
) -> LoadedModel:
    """Load ``model``: a preset name, a local checkpoint directory, or a ``PreTrainedModel``.

    Presets get seeded random weights (same seed, same weights) and a ``ByteTokenizer``; a
    directory is read with ``from_pretrained(local_files_only=True)`` plus its ``AutoTokenizer``.
    ``dtype`` may be a ``torch.dtype`` or its name (``"bfloat16"``). Raises ``ValueError`` for
    anything else (listing the presets) and ``FileNotFoundError`` for a directory without a
    ``config.json`` or a loadable tokenizer.
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved

    if isinstance(model, PreTrainedModel):
        name = model.config.name_or_path or type(model).__name__
        return _finish(name, model, None, device, dtype)
    if isinstance(model, str) and model in PRESETS:
        hf_model = build_preset(model, device=device, dtype=dtype, seed=seed)
        return _finish(model, hf_model, ByteTokenizer(), device, dtype)
    if isinstance(model, str | os.PathLike) and Path(model).is_dir():
        return _load_checkpoint(Path(model), device=device, dtype=dtype)
    raise ValueError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), not an existing local "
        "checkpoint directory, and not a transformers PreTrainedModel (no model hub is used)"
    )


def model_config(model: str | os.PathLike[str]) -> PretrainedConfig:
    """The HF config of a preset or a checkpoint directory, without building the model."""
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model].make_config()
    if Path(model).is_dir() and (Path(model) / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, local_files_only=True)
    raise ValueError(
        f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and not a local "
        "checkpoint directory with a config.json"
    )


def load_tokenizer(model: str | os.PathLike[str]) -> Any:
    """The tokenizer of a preset (byte-level) or of a checkpoint directory, without weights."""
    if isinstance(model, str) and model in PRESETS:
        return ByteTokenizer()
    model_config(model)  # a clear error for anything else
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def model_limits(model: str | os.PathLike[str]) -> tuple[int, int]:
    """``(vocab_size, max_seq_len)`` of a preset or a checkpoint directory, without building the
    model: lets a harness size and check its workload before any weights are made."""
    config = model_config(model)
    return int(config.vocab_size), int(config.max_position_embeddings)


@dataclass(frozen=True)
class ModelShape:
    """What a cost model needs to know of a model, without its weights."""

    num_params: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_elements_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one query-key pair over all layers and heads (QK^T and PV)."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


def model_shape(model: str | os.PathLike[str]) -> ModelShape:
    """Parameter count and attention shape of a preset or checkpoint (built on the meta device:
    no memory, no weights)."""
    config = model_config(model)
    if isinstance(model, str) and model in PRESETS:
        model_class = PRESETS[model].model_class
    else:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM.from_config
    with torch.device("meta"):
        meta = model_class(config)
    heads = config.num_attention_heads
    return ModelShape(
        num_params=sum(p.numel() for p in meta.parameters()),
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )
