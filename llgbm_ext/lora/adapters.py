"""Adapter files: PEFT directories and DnD's flat ``<step>.safetensors`` files, read, validated and written.

* PEFT directory: ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by
  ``PeftModel.from_pretrained``, and so by vLLM).
* DnD flat file: the same tensors under the same raw PEFT keys in one ``<step>.safetensors``; DnD's
  training folders ``data/<family>/<Dataset>/`` hold only such files, one optimizer step each.

Tensors are read only through safetensors (never pickle). Every problem is raised as an
``AdapterError`` whose one-line message names the file and, where there is one, the key.
Writes are atomic.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_dir, atomic_path
from ..errors import AdapterError
from .layout import PEFT_PREFIX, LoraLayout

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Adapter:
    """One adapter read from disk: PEFT state dict (canonical keys), its config (if any) and origin."""

    state_dict: dict[str, Tensor]
    path: Path
    config: dict | None = None


def canonical_key(key: str) -> str:
    """Normalise a LoRA key to PEFT's on-disk form: drop an adapter name, add the ``base_model.model.`` prefix."""
    key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    if key.startswith("_orig_mod."):
        key = key[len("_orig_mod."):]
    if key.startswith("model.layers."):
        key = PEFT_PREFIX + key
    return key


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file is a one-line AdapterError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError with a short reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: not a readable safetensors file ({reason})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return data


def load_adapter(path: str | os.PathLike, layout: LoraLayout | None = None, dtype: torch.dtype | None = None) -> Adapter:
    """Read a PEFT adapter directory or a DnD ``<step>.safetensors`` file; validate it if ``layout`` is given."""
    path = Path(path)
    config = None
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise AdapterError(f"{path}: holds only adapter_model.bin (pickle); save the adapter as safetensors")
            raise AdapterError(f"{path}: missing {WEIGHTS_NAME} (not a PEFT adapter directory)")
        if (path / CONFIG_NAME).is_file():
            config = _read_json(path / CONFIG_NAME)
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"{path}: expected a PEFT adapter directory or a .safetensors file")
        weights = path
    else:
        raise AdapterError(f"{path}: no such adapter file or directory")
    state_dict = {canonical_key(k): v for k, v in read_safetensors(weights).items()}
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    if layout is not None:
        validate_state_dict(state_dict, layout, source=weights)
        if config is not None and "r" in config and int(config["r"]) != layout.rank:
            raise AdapterError(f"{path / CONFIG_NAME}: r = {config['r']}, layout {layout.name!r} expects rank {layout.rank}")
    return Adapter(state_dict=state_dict, path=path, config=config)


def _geometry_hint(keys, layout: LoraLayout) -> str:
    layers = {int(m.group(1)) for k in keys if (m := _LAYER_RE.search(k))}
    found = f"{max(layers) + 1} layers" if layers else "no layer keys"
    return f"adapter has {found}, layout {layout.name!r} expects {layout.num_layers}"


def validate_state_dict(state_dict: dict[str, Tensor], layout: LoraLayout, source: str | os.PathLike = "adapter") -> None:
    """Check keys, shapes (rank), dtype and finiteness against ``layout``; raise a one-line AdapterError."""
    expected = layout.expected_shapes()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing:
        raise AdapterError(
            f"{source}: missing key {missing[0]} ({len(missing)} of {len(expected)} expected keys missing; "
            f"{_geometry_hint(state_dict, layout)})"
        )
    if extra:
        raise AdapterError(
            f"{source}: unexpected key {extra[0]} ({len(extra)} keys not in layout {layout.name!r}; "
            f"{_geometry_hint(state_dict, layout)})"
        )
    for key, shape in expected.items():
        tensor = state_dict[key]
        if tuple(tensor.shape) != shape:
            got_rank = tensor.shape[0] if ".lora_A." in key else tensor.shape[-1]
            why = f"rank {got_rank} vs {layout.rank}" if tensor.dim() == 2 and got_rank != layout.rank else "other geometry"
            raise AdapterError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, layout {layout.name!r} expects {shape} ({why})"
            )
        if not tensor.is_floating_point():
            raise AdapterError(f"{source}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            raise AdapterError(f"{source}: {key} contains {what} values")


def _contiguous(state_dict: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {k: (v.detach().to(dtype) if dtype else v.detach()).contiguous().cpu() for k, v in state_dict.items()}


def save_peft_adapter(
    state_dict: dict[str, Tensor],
    out_dir: str | os.PathLike,
    layout: LoraLayout,
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    extra_json: dict[str, object] | None = None,
) -> Path:
    """Write a PEFT adapter directory atomically (replacing an existing one). ``extra_json`` adds files
    such as ``prompts.json`` (name -> JSON-serialisable object)."""
    validate_state_dict(state_dict, layout, source=out_dir)
    config = layout.adapter_config(base_model_name_or_path)
    if float(config["lora_alpha"]).is_integer():
        config["lora_alpha"] = int(config["lora_alpha"])
    with atomic_dir(out_dir) as tmp:
        save_file(_contiguous(state_dict, dtype), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return Path(out_dir)


def save_dnd_checkpoint(
    state_dict: dict[str, Tensor], path: str | os.PathLike, layout: LoraLayout, *, dtype: torch.dtype | None = None
) -> Path:
    """Write one DnD flat ``<step>.safetensors`` file (raw PEFT keys) atomically."""
    validate_state_dict(state_dict, layout, source=path)
    with atomic_path(path) as tmp:
        save_file(_contiguous(state_dict, dtype), str(tmp), metadata={"format": "pt"})
    return Path(path)


def list_adapters(path: str | os.PathLike) -> list[Path]:
    """Expand a path into adapters: a PEFT directory, a ``.safetensors`` file, a DnD flat folder of
    ``<step>.safetensors`` (numeric order), or a folder of PEFT directories (sorted)."""
    path = Path(path)
    if path.is_file() or (path / WEIGHTS_NAME).is_file():
        return [path]
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter file or directory")
    flat = [p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file()]
    if flat:
        return sorted(flat, key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem))
    peft_dirs = sorted(p.parent for p in path.glob(f"**/{WEIGHTS_NAME}"))
    if not peft_dirs:
        raise AdapterError(f"{path}: no adapters found (no .safetensors files or PEFT adapter directories)")
    return peft_dirs
