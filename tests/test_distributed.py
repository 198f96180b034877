"""Two training processes on CPU (gloo) through ``accelerate launch`` with the shipped configs.

Each process steps its half of every global batch, so both must end with bit-identical generator
weights, and those must equal a single process stepping the same global batches up to float noise
(the gradient is summed in another order). Tolerance: the weights' distance from the single-process
run at most 1e-3 of the distance they moved in training (measured: about 5e-5, for DDP and ZeRO-2
alike; Adam's normalised update enlarges the noise of near-zero gradients, so a plain per-element
tolerance would be loose elsewhere). Under DeepSpeed ZeRO a checkpoint also resumes bit-identically.
ZeRO-2 runs in every test run; ZeRO-3 (which also partitions the frozen base model) only with
LLGBM_SLOW_TESTS=1, as each DeepSpeed case takes 1-2 minutes on 2 cores.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from fake_teachers import write_fake_teachers
from safetensors.torch import load_file, save_file

from llgbm_ext.config import load_config
from llgbm_ext.generator.build import build_generator
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.training import Trainer, TrainingConfig
from llgbm_ext.training.checkpoint import weights_digest

STEPS = 4
RUN = ["encoder.kind=base-model", "encoder.model=tiny", "generator.kind=simple", "generator.embed_dim=128",
       "optim.warmup_steps=2", "loss.mode=multitask", f"steps={STEPS}", "batch_size=4", "save_every=2", "loss.noise=0"]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="module")
def single(teachers, tmp_path_factory):
    """The reference: one process, the same global batches."""
    out = tmp_path_factory.mktemp("single")
    cfg = load_config(TrainingConfig, None, [f"data.teachers={teachers}", f"out_dir={out}", "device=cpu", *RUN])
    Trainer(cfg, progress=False).setup().train()
    return out


def launch(accelerate_config: str, teachers: Path, out: Path, *extra: str) -> None:
    """``accelerate launch --num_processes 2 -m llgbm_ext train``, from the repository root (the configs'
    paths are relative to it). DeepSpeed's compiled CPU op is kept where torch keeps it by default."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", f"configs/accelerate/{accelerate_config}", "--num_processes", "2",
           "-m", "llgbm_ext", "train", "--no-progress", f"data.teachers={teachers}", f"out_dir={out}", *RUN, *extra]
    result = subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def checkpoint(out: Path, step: int = STEPS) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_matches_single_process(out: Path, single: Path, replicated: bool = True) -> None:
    weights = load_file(str(checkpoint(out) / "trainable.safetensors"))
    replicas = [json.loads((checkpoint(out) / f"rank_{r}" / "replica.json").read_text())["weights_sha256"] for r in (0, 1)]
    if replicated:  # both processes hold the saved weights, bit for bit
        assert replicas[0] == replicas[1] == weights_digest(weights)
    else:  # ZeRO-3: each holds a partition only
        assert replicas == [None, None]

    reference = load_file(str(checkpoint(single) / "trainable.safetensors"))
    cfg = load_config(TrainingConfig, single / "config.yaml")
    initial = {f"generator.{k}": v for k, v in build_generator(cfg.generator, get_layout("tiny")).state_dict().items()}
    assert weights.keys() == reference.keys() == initial.keys()
    distance = torch.cat([(weights[k] - reference[k]).flatten() for k in weights]).norm()
    moved = torch.cat([(reference[k] - initial[k]).flatten() for k in weights]).norm()
    assert moved > 0 and distance <= TOLERANCE * moved, f"{float(distance):.3g} vs {float(moved):.3g} moved"

    # the logged losses are means over the processes: the global batch's, as the single process logs them
    got, want = metrics(out), metrics(single)
    assert [r["step"] for r in got] == list(range(STEPS))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)


def test_ddp_two_processes_match_one(teachers, single, tmp_path):
    cache = tmp_path / "cache"  # cold: both processes compute half of the teacher deltas, rank 0 stores them
    launch("ddp.yaml", teachers, tmp_path / "ddp", f"delta.cache={cache}")
    assert_matches_single_process(tmp_path / "ddp", single)
    assert (checkpoint(tmp_path / "ddp") / "rank_1" / "rng.safetensors").is_file()

    stored = {f.name: np.load(f, allow_pickle=False) for f in cache.glob("*.npy")}
    reference = {f.name: np.load(f, allow_pickle=False) for f in (teachers / "deltas").glob("*.npy")}
    assert len(stored) == 7 and stored.keys() == reference.keys()  # base activation + 6 teachers
    for name, value in stored.items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-4, atol=1e-5)


SLOW = pytest.mark.skipif(not os.environ.get("LLGBM_SLOW_TESTS"), reason="1-2 min on 2 cores; set LLGBM_SLOW_TESTS=1")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (extra 'deepspeed')")
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=SLOW)])
def test_deepspeed_two_processes_match_one_and_resume_exactly(stage, teachers, single, tmp_path):
    run = tmp_path / f"zero{stage}"
    launch(f"zero{stage}.yaml", teachers, run)
    assert_matches_single_process(run, single, replicated=stage < 3)
    state = json.loads((checkpoint(run) / "state.json").read_text())
    assert (state["processes"], state["zero_stage"]) == (2, stage)
    partitions = [torch.load(checkpoint(run) / f"rank_{r}" / "optimizer.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(partitions[0]["master"][0], partitions[1]["master"][0])  # each holds its own half

    # a copy of the run that has only its step-2 checkpoint resumes to the same step-4 state, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(checkpoint(resumed))
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    launch(f"zero{stage}.yaml", teachers, resumed, "--resume")
    a = load_file(str(checkpoint(run) / "trainable.safetensors"))
    b = load_file(str(checkpoint(resumed) / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):
        again = torch.load(checkpoint(resumed) / f"rank_{r}" / "optimizer.pt", weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(again["master"], partitions[r]["master"]))
        state_a, state_b = partitions[r]["state"][0], again["state"][0]
        assert state_a.keys() == {"step", "exp_avg", "exp_avg_sq"} and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(run)]


# --- teacher targets of `llgbm dnd teachers` on two processes -------------------------------------------

def teachers_on_two_processes(teachers: Path, cache: Path, port: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m llgbm_ext dnd teachers`` on CPU (gloo): the ranks split the misses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folders = sorted(str(p) for p in (teachers / "data" / "fake").iterdir())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "llgbm_ext", "dnd", "teachers", "--dnd-root", str(teachers), "--device", "cpu",
           "--set", "base_model=tiny", "--set", "layout=tiny", "--set", "probes=generic", "--set", "dtype=float32",
           "--set", f"cache_dir={cache}", *folders]
    # generous: a hang would last until the collective timeout (30 min); a clean stop takes seconds
    return subprocess.run(cmd, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_dnd_teachers_on_two_processes_fill_the_cache(teachers, tmp_path):
    done = teachers_on_two_processes(teachers, tmp_path / "cache", 29531)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("llgbm dnd teachers: targets of delta for 6 distinct teacher(s) of 6 file(s)") == 1
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["adapters"]) == 6


def test_a_diverged_teacher_on_one_rank_stops_both_ranks_with_one_line(teachers, tmp_path):
    """The second teacher (the share of rank 1) has overflowing weights: its Δ is not finite. Rank 1
    finds it; both ranks end with the same one-line error naming the file, none waits at a collective."""
    bad = tmp_path / "teachers"
    shutil.copytree(teachers, bad)
    path = min((bad / "data" / "fake").iterdir()) / "1.safetensors"
    save_file({k: v * 1e20 for k, v in load_file(str(path)).items()}, str(path))
    done = teachers_on_two_processes(bad, tmp_path / "cache", 29532)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("llgbm dnd: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]
    assert f"{path}: its delta teacher targets are not finite" in errors[0] and "(rank 1 of 2)" in errors[0]
