"""Training checkpoints with the full state for an exact resume, and nothing loaded through pickle.

``<out_dir>/checkpoints/step_<N>/``::

    trainable.safetensors   generator (and delta head) weights and buffers
    optimizer.pt            optimizer and scheduler state dicts (read with torch.load(weights_only=True))
    rng.safetensors         torch CPU (and CUDA) RNG states
    state.json              step, config digest

``<out_dir>/checkpoints/latest`` names the newest complete checkpoint; it is written last, so a run
killed while saving resumes from the previous one. Batches need no saved state: each step's batch
is a function of (seed, step) (``training.data``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, write_text
from ..errors import LLGBMError

LATEST = "latest"
RUN_INFO = "run.json"  # <out_dir>/run.json: layout, base model and tasks of the run, for generation


class CheckpointError(LLGBMError):
    """A checkpoint is missing, incomplete or from a different run configuration."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | os.PathLike, step: int, trainable: torch.nn.Module, optimizer, scheduler,
                    config_digest: str, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and keep the newest ``keep``."""
    root = checkpoint_root(out_dir)
    path = root / f"step_{step:07d}"
    state = {k: v.detach().contiguous().cpu() for k, v in trainable.state_dict().items()}
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "config_digest": config_digest}) + "\n")
    write_text(root / LATEST, path.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(out_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{marker}: names {path.name}, which is incomplete or missing")
    return path


def load_module_weights(path: str | os.PathLike, module: str) -> dict[str, torch.Tensor]:
    """The weights of one trained module (``generator`` or ``head``) of a checkpoint, without its prefix."""
    path = Path(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    prefix = module + "."
    found = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if not found:
        raise CheckpointError(f"{path}: holds no {module} weights")
    return found


def load_checkpoint(path: str | os.PathLike, trainable: torch.nn.Module, optimizer=None, scheduler=None,
                    config_digest: str | None = None) -> int:
    """Restore a checkpoint into the given objects; returns its step."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if config_digest is not None and state.get("config_digest") != config_digest:
        raise CheckpointError(f"{path}: written by a run with a different configuration; use a new out_dir")
    missing, unexpected = trainable.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if optimizer is not None:
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
    return int(state["step"])
