"""Training checkpoints with the full state for an exact resume, and nothing loaded through pickle.

``<out_dir>/checkpoints/step_<N>/``::

    trainable.safetensors      generator (and delta head) weights and buffers
    optimizer.pt               optimizer and scheduler state dicts (torch.load(weights_only=True));
                               under DeepSpeed ZeRO only the scheduler's (the optimizer's is per process)
    rank_<r>/rng.safetensors   torch CPU (and CUDA) RNG states of process r
    rank_<r>/replica.json      digest of process r's copy of the weights (none under ZeRO-3)
    rank_<r>/optimizer.pt      ZeRO only: process r's optimizer partition (fp32 masters, Adam state)
    state.json                 step, config digest, settings, number of processes, ZeRO stage

Every process first writes its own ``rank_<r>`` folder into ``checkpoints/.step_<N>.ranks/``; the
main process then builds the checkpoint in a temporary folder, moves the rank folders in, renames it
into place (``atomic_dir``) and only then rewrites ``latest``. So a run killed at any moment resumes
from the newest complete checkpoint, and a folder named ``step_<N>`` is always complete. A
checkpoint whose processes hold different weights (replicas that drifted apart) is refused. Batches
need no saved state: each step's batch is a function of (seed, step) (``training.data``). A
checkpoint resumes with the number of processes that wrote it (each has its own RNG stream and,
under ZeRO, its own optimizer partition), and with the settings that wrote it (``check_resume``):
``state.json`` keeps every setting that determines the weights, so a resume with another one is
refused by name. ``steps`` may grow; the learning-rate schedule keeps the length it had (it is part of
the scheduler state), so an extended run continues at the floor of the original schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir, write_text
from ..errors import LLGBMError

LATEST = "latest"
RUN_INFO = "run.json"  # <out_dir>/run.json: layout, base model and tasks of the run, for generation


class CheckpointError(LLGBMError):
    """A checkpoint is missing, incomplete or from a different run configuration."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:07d}"


def _staging(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(out_dir) / f".{_step_name(step)}.ranks"


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU and every CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_rank_state(out_dir: str | os.PathLike, step: int, rank: int, replica: dict[str, torch.Tensor] | None,
                    zero_partition: dict | None = None) -> None:
    """Every process, before ``save_checkpoint``: its RNG states, the digest of its copy of the weights
    (``replica``; None where it holds only a partition) and its ZeRO optimizer partition, staged."""
    with atomic_dir(_staging(out_dir, step) / f"rank_{rank}") as tmp:
        save_file(rng_state(), str(tmp / "rng.safetensors"))
        digest = weights_digest(replica) if replica is not None else None
        (tmp / "replica.json").write_text(json.dumps({"weights_sha256": digest}) + "\n")
        if zero_partition is not None:
            torch.save(zero_partition, tmp / "optimizer.pt")


def save_checkpoint(out_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict | None,
                    scheduler_state: dict, config_digest: str, processes: int = 1, zero_stage: int = 0,
                    keep: int = 2, settings: dict | None = None) -> Path:
    """Main process, after every process ran ``save_rank_state``: write checkpoint ``step`` atomically,
    point ``latest`` at it, and keep the newest ``keep``. ``settings``: what a resume must keep (flat, JSON)."""
    root = checkpoint_root(out_dir)
    path = root / _step_name(step)
    staging = _staging(out_dir, step)
    state = {"step": step, "config_digest": config_digest, "processes": processes, "zero_stage": zero_stage,
             "settings": settings}
    digests = {json.loads((staging / f"rank_{r}" / "replica.json").read_text())["weights_sha256"] for r in range(processes)}
    if len(digests - {None}) > 1:
        raise CheckpointError(f"{path}: the {processes} processes hold different weights at step {step}")
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler_state}, tmp / "optimizer.pt")
        for rank in range(processes):
            os.replace(staging / f"rank_{rank}", tmp / f"rank_{rank}")
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
    write_text(root / LATEST, path.name + "\n")
    shutil.rmtree(staging, ignore_errors=True)
    _prune(root, keep)
    return path


def _prune(root: Path, keep: int) -> None:
    """Drop all but the newest ``keep`` checkpoints, and what killed writers left (hidden ``.*`` entries)."""
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for left in root.glob(".*"):
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


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


def _read(path: Path, what, name: str):
    try:
        return what(path / name)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # how truncated or corrupt files fail
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / name}: unreadable checkpoint file ({reason})") from None


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, lambda p: load_file(str(p)), "trainable.safetensors")


def _torch_load(file: Path):
    return torch.load(file, map_location="cpu", weights_only=True)


def load_module_weights(path: str | os.PathLike, module: str) -> dict[str, torch.Tensor]:
    """The weights of one trained module (``generator`` or ``head``) of a checkpoint, without its prefix."""
    path = Path(path)
    prefix = module + "."
    found = {k[len(prefix):]: v for k, v in _weights(path).items() if k.startswith(prefix)}
    if not found:
        raise CheckpointError(f"{path}: holds no {module} weights")
    return found


def _state(path: Path) -> dict:
    return _read(path, lambda p: json.loads(p.read_text()), "state.json")


def check_resume(path: str | os.PathLike, settings: dict, config_digest: str, steps: int, processes: int) -> int:
    """Refuse to resume from checkpoint ``path`` what would not continue its run: other ``settings`` (named in
    the error), ``steps`` below the checkpoint's step, another number of processes. Returns its step.

    Checkpoints written before ``state.json`` kept the settings are compared by ``config_digest``."""
    path = Path(path)
    state = _state(path)
    saved = state.get("settings")
    if saved is not None:
        absent = "(absent)"
        differ = sorted(k for k in saved.keys() | settings.keys() if saved.get(k, absent) != settings.get(k, absent))
        if differ:
            shown = "; ".join(f"{k} {json.dumps(saved.get(k, absent))} there, {json.dumps(settings.get(k, absent))} now"
                              for k in differ[:3])
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise CheckpointError(f"{path}: written with other settings ({shown}{more}); resume with the settings "
                                  "of that run or use a new out_dir")
    elif state.get("config_digest") != config_digest:
        raise CheckpointError(f"{path}: written by a run with a different configuration; use a new out_dir")
    step = int(state["step"])
    if step > steps:
        raise CheckpointError(f"{path}: at step {step}, beyond steps={steps}; resume with steps >= {step}")
    written_by = state.get("processes", 1)
    if written_by != processes:
        raise CheckpointError(f"{path}: written by {written_by} process(es), resumed with {processes}; an exact "
                              f"resume needs the same number (accelerate launch --num_processes {written_by})")
    return step


def load_weights(path: str | os.PathLike, trainable: torch.nn.Module) -> int:
    """Restore the trained weights (before the model is wrapped for several processes); returns the step.
    ``check_resume`` first decides whether the checkpoint may be resumed."""
    path = Path(path)
    state = _state(path)
    missing, unexpected = trainable.load_state_dict(_weights(path), strict=False)
    missing = [k for k in missing if not k.startswith("base.")]  # the frozen base (a ZeRO-3 submodule) is never saved
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return int(state["step"])


def load_training_state(path: str | os.PathLike, optimizer, scheduler, rank: int = 0, zero_optimizer=None) -> None:
    """Restore optimizer (or, under ZeRO, this process's partition), scheduler and this process's RNG."""
    path = Path(path)
    shared = _read(path, _torch_load, "optimizer.pt")
    if zero_optimizer is not None:
        load_zero_partition(zero_optimizer, _read(path / f"rank_{rank}", _torch_load, "optimizer.pt"), path)
    else:
        optimizer.load_state_dict(shared["optimizer"])
    scheduler.load_state_dict(shared["scheduler"])
    rng = _read(path / f"rank_{rank}", lambda p: load_file(str(p)), "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --- DeepSpeed ZeRO: each process owns a partition of the optimizer --------------------------------
def _masters(zero_optimizer) -> list[torch.Tensor]:
    """The fp32 master partitions a ZeRO optimizer's inner torch optimizer steps (named per stage)."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # stages 1-2, stage 3
        if hasattr(zero_optimizer, name):
            return list(getattr(zero_optimizer, name))
    raise CheckpointError(f"{type(zero_optimizer).__name__}: no fp32 master partitions found; cannot checkpoint it")


def _cpu(value):
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def zero_partition(zero_optimizer) -> dict:
    """This process's share of a ZeRO optimizer: its master partitions, the inner optimizer's state of
    each (Adam moments, step) and the hyperparameters of its groups (lr ...); tensors and numbers only."""
    inner = zero_optimizer.optimizer
    masters = _masters(zero_optimizer)
    return {"master": [_cpu(m) for m in masters],
            "state": [{k: _cpu(v) for k, v in inner.state[m].items()} for m in masters],
            "groups": [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]}


def load_zero_partition(zero_optimizer, saved: dict, path: Path) -> None:
    inner = zero_optimizer.optimizer
    masters = _masters(zero_optimizer)
    if [tuple(m.shape) for m in saved["master"]] != [tuple(m.shape) for m in masters]:
        raise CheckpointError(f"{path}: its ZeRO partitions do not fit this run's (another DeepSpeed config?)")
    with torch.no_grad():
        for master, value, state in zip(masters, saved["master"], saved["state"]):
            master.copy_(value)
            inner.state[master] = {k: v.to(master.device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    for group, hyper in zip(inner.param_groups, saved["groups"]):
        group.update(hyper)
