"""Base models by name: ``tiny`` (embedded), a local model directory, or a Hugging Face hub id.

Every command that takes a base model goes through ``resolve_base_model``, so ``tiny`` works
everywhere and a real Qwen2.5 model is just another directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from .shipped import shipped_tiny_model
from .smollm2 import ensure_smollm2
from .tiny import ensure_tiny_model

# Built-in models: name -> function that returns (creating on first use) the model directory.
# "tiny" is the pretrained tiny model shipped with the package (models.shipped); "tiny-random" its
# random initialisation, built from code.
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny": shipped_tiny_model, "tiny-random": ensure_tiny_model, "smollm2-135m": ensure_smollm2}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_model_dir(path: Path) -> None:
    """Raise a one-line ModelError naming what a model directory lacks (config, safetensors weights, tokenizer)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise ModelError(f"{path}: holds only pickle weights (*.bin); convert them to safetensors")
        missing.append("model.safetensors")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or vocab.json)")
    if missing:
        raise ModelError(f"{path}: not a usable model directory, missing {', '.join(missing)}")


def resolve_base_model(name: str | os.PathLike) -> Path:
    """Local directory of a base model: a built-in name, an existing directory, or a cached hub id."""
    key = str(name)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]()
    path = Path(key).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: a base model must be a directory (config.json, weights, tokenizer)")
        check_model_dir(path)
        return path
    if key.count("/") != 1 or key.startswith((".", "/", "~")):
        raise ModelError(f"{key}: no such model directory, and not a built-in name ({sorted(BUILTIN_MODELS)}) or hub id")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(key, local_files_only=True))
    except Exception:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = "HF_HUB_OFFLINE is set" if offline else "it is not downloaded automatically"
        raise ModelError(
            f"{key}: hub model not found in the local Hugging Face cache ({hint}); run "
            f"`huggingface-cli download {key}` on a machine that reaches the hub, or pass a local directory"
        ) from None
    check_model_dir(local)
    return local


def load_base_model(
    name: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Load (model, tokenizer); the model is frozen (no grad) and in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_model(name)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    # transformers 5 renamed ``torch_dtype`` to ``dtype``; 4.x (DnD pins 4.49) knows only the old name
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_kw: torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
