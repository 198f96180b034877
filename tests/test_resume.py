"""Exact resume after SIGKILL, and kills during writes that leave nothing corrupt behind.

* ``llgbm train`` killed (SIGKILL, from outside) after its step-2 checkpoint and resumed with
  ``--resume`` ends with generator weights bit-identical to an uninterrupted run (CPU, fixed seed,
  condition noise on, so the RNG state is part of what must be restored).
* A resume is told from a restart: training is a function of (seed, step), so a run restarted from
  step 0 would end identically. The resumed process says at which step it resumes, the metrics rows
  of the steps before it are the first process's, byte for byte (each row holds its step's wall time),
  and every later step is logged anew, once. On one process and on two (DDP through ``accelerate``).
* A resume with a setting that changes the result (learning rate, loss, generator, noise, fewer
  steps than done) is refused with one line naming the checkpoint and the setting; ``steps`` may grow.
* A process killed half-way through writing a checkpoint file or a DeltaCache entry: the kill is
  injected by running the CLI in a wrapper that replaces one write function with one that writes
  half of the bytes and then sends itself SIGKILL, so the process dies with a truncated file on disk.
  Readers must see the previous checkpoint / no entry, and the next run must complete normally.
* ``llgbm teachers`` killed after a saved training state continues to the same teachers.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.config import load_config
from llgbm_ext.training import Trainer, TrainingConfig
from llgbm_ext.training.checkpoint import latest_checkpoint

STEPS = 8
RUN = ["encoder.kind=base-model", "encoder.model=tiny", "generator.kind=simple", "generator.embed_dim=128",
       "device=cpu", "optim.warmup_steps=2", "loss.mode=multitask", f"steps={STEPS}", "batch_size=2",
       "save_every=2", "loss.noise=1e-3"]

# Runs the CLI (argv[2:]) with one write replaced: the safetensors file whose path matches the pattern
# argv[1] (fnmatch), or the n-th np.save for "np.save#n", gets half of its bytes, then the process
# kills itself with SIGKILL (no cleanup, no exception handlers run).
DYING_WRITE = """
import fnmatch, io, os, signal, sys
import numpy as np
import llgbm_ext.training.checkpoint as checkpoint
from safetensors.torch import save as to_bytes

target, calls = sys.argv[1], {"n": 0}

def die_half_written(data: bytes, file) -> None:
    file.write(data[: len(data) // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

real_save_file = checkpoint.save_file
def save_file(tensors, filename, metadata=None):
    if fnmatch.fnmatch(filename, target):
        with open(filename, "wb") as f:
            die_half_written(to_bytes(tensors, metadata), f)
    real_save_file(tensors, filename, metadata)
checkpoint.save_file = save_file

real_np_save = np.save
def np_save(file, array, allow_pickle=True):
    calls["n"] += 1
    if target == f"np.save#{calls['n']}":
        buffer = io.BytesIO()
        real_np_save(buffer, array, allow_pickle=False)
        die_half_written(buffer.getvalue(), file)
    real_np_save(file, array, allow_pickle=allow_pickle)
np.save = np_save

from llgbm_ext.cli import main
sys.exit(main(sys.argv[2:]))
"""


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="module")
def straight(teachers, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(load_config(TrainingConfig, None, [f"data.teachers={teachers}", f"out_dir={out}", *RUN]), progress=False).setup().train()
    return out


def train_args(teachers: Path, out: Path) -> list[str]:
    return ["train", "--no-progress", f"data.teachers={teachers}", f"out_dir={out}", *RUN]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{STEPS:07d}" / "trainable.safetensors"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def metric_lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


def checkpoint_step(path: Path) -> int:
    return json.loads((path / "state.json").read_text())["step"]


def assert_resumed_at(out: Path, before: list[str], start: int, steps: int = STEPS) -> None:
    """The steps before ``start`` were not run again (their rows are those logged ``before`` the resume, byte
    for byte) and every step from ``start`` on was run by the resumed process, once (rows not seen before)."""
    after = metric_lines(out)
    assert [json.loads(line)["step"] for line in after] == list(range(steps))
    assert after[:start] == before[:start]
    assert not set(after[start:]) & set(before)


def assert_same_as_straight(out: Path, straight: Path) -> None:
    assert losses(out) == losses(straight)
    a, b = final_weights(out), final_weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_training_then_resume_is_bit_identical(teachers, straight, tmp_path, capsys):
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "llgbm_ext", *train_args(teachers, out)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # step 2 logged: the step-2 checkpoint is written and training is under way
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "checkpoints" / f"step_{STEPS:07d}").exists(), "the run finished before it was killed"
    resumed_from = latest_checkpoint(out)
    assert resumed_from is not None and (resumed_from / "state.json").is_file()
    start, before = checkpoint_step(resumed_from), metric_lines(out)
    assert 2 <= start < STEPS

    capsys.readouterr()
    assert main([*train_args(teachers, out)[:1], "--resume", *train_args(teachers, out)[1:]]) == 0
    assert f"{out}: resuming at step {start} from {resumed_from}" in capsys.readouterr().out
    assert_resumed_at(out, before, start)
    assert_same_as_straight(out, straight)


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(teachers, straight, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", DYING_WRITE, "*/.step_0000004.*/trainable.safetensors",
                           *train_args(teachers, out)], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["latest", "step_0000002"]
    assert list(root.glob(".step_0000004.*.tmp/trainable.safetensors"))  # the half-written file, hidden
    before = metric_lines(out)

    assert main(["train", "--resume", *train_args(teachers, out)[1:]]) == 0
    assert_resumed_at(out, before, 2)
    assert_same_as_straight(out, straight)
    assert not list(root.glob(".*"))  # the next save cleared what the killed writer left


def launch_two_processes(teachers: Path, out: Path, *extra: str) -> str:
    """``llgbm train`` on 2 processes (DDP on gloo, ``configs/accelerate/ddp.yaml``) for 4 steps; its stdout."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           "configs/accelerate/ddp.yaml", "--num_processes", "2", "-m", "llgbm_ext",
           *train_args(teachers, out), "steps=4", *extra]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_two_processes_resume_at_the_checkpoint_step(teachers, tmp_path):
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    launch_two_processes(teachers, run)
    shutil.copytree(run, resumed)  # a copy of the run that has only its step-2 checkpoint
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    before = metric_lines(resumed)

    printed = launch_two_processes(teachers, resumed, "--resume")
    assert printed.count(f"{resumed}: resuming at step 2 from {resumed / 'checkpoints' / 'step_0000002'}") == 1
    assert_resumed_at(resumed, before, 2, steps=4)
    final = [load_file(str(out / "checkpoints" / "step_0000004" / "trainable.safetensors")) for out in (run, resumed)]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert [json.loads(line)["loss"] for line in metric_lines(resumed)] == [json.loads(line)["loss"] for line in before]


@pytest.mark.parametrize("change, named", [
    ("optim.lr=2e-3", "optim.lr 0.001 there, 0.002 now"),
    ("loss.mode=weight_only", 'loss.mode "multitask" there, "weight_only" now'),
    ("generator.embed_dim=64", "generator.embed_dim 128 there, 64 now"),
    ("loss.noise=0", "loss.noise 0.001 there, 0.0 now"),
    ("steps=4", "at step 8, beyond steps=4"),
])
def test_resume_with_other_settings_is_refused(teachers, straight, tmp_path, capsys, change, named):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", *train_args(teachers, out)[1:], change]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"llgbm train: error: {out / 'checkpoints' / 'step_0000008'}: ")
    assert named in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing written


def test_resume_of_a_checkpoint_without_settings_compares_the_digest(teachers, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    state = out / "checkpoints" / "step_0000008" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "settings"}))
    capsys.readouterr()
    assert main(["train", "--resume", *train_args(teachers, out)[1:], "optim.lr=2e-3"]) == 2
    assert "written by a run with a different configuration" in capsys.readouterr().err


def test_resume_may_extend_steps_and_change_when_it_saves(teachers, straight, tmp_path, capsys):
    """More steps continue the finished run (the schedule keeps its length: lr stays at its floor)."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = metric_lines(out)
    capsys.readouterr()
    assert main(["train", "--resume", *train_args(teachers, out)[1:], "steps=10", "save_every=5", "keep_checkpoints=1"]) == 0
    assert f"resuming at step {STEPS} from" in capsys.readouterr().out
    assert_resumed_at(out, before, STEPS, steps=10)
    rows = [json.loads(line) for line in metric_lines(out)]
    assert rows[-1]["lr"] == rows[-2]["lr"] == pytest.approx(0.1 * 1e-3)  # the floor of the 8-step schedule
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000010"]


def test_kill_while_writing_a_cache_entry_leaves_no_corrupt_entry(teachers, tmp_path):
    from llgbm_ext.delta.cache import DeltaCache

    cache = tmp_path / "cache"
    args = ["deltas", "--base-model", "tiny", "--adapters", str(teachers / "add_1"), str(teachers / "add_2"),
            "--out", str(cache)]
    # write 1 is the base activation, write 3 the second teacher's delta
    done = subprocess.run([sys.executable, "-c", DYING_WRITE, "np.save#3", *args], env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert list(cache.glob(".*.tmp"))  # the half-written array, under a temporary name

    problems = DeltaCache(cache).verify()
    assert any("interrupted write" in p for p in problems)  # the killed writer's temporary file
    assert not [p for p in problems if "dropped" in p]  # no record is corrupt

    assert main(args) == 0
    clean = tmp_path / "clean"
    assert main([*args[:-1], str(clean)]) == 0
    got = {f.name: np.load(f, allow_pickle=False) for f in cache.glob("*.npy")}
    want = {f.name: np.load(f, allow_pickle=False) for f in clean.glob("*.npy")}
    assert len(got) == 5 and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in got)


TEACHERS = ["--base-model", "tiny", "--tasks", "arc_e", "--warmup-steps", "2", "--snapshot-every", "2", "--snapshots", "6",
            "--save-every", "2", "--batch-size", "4", "--eval-limit", "0", "--no-deltas", "--no-progress"]


def test_sigkill_teachers_then_rerun_gives_the_same_teachers(tmp_path):
    data = tmp_path / "data"  # a small multiple-choice task in DnD's format
    data.mkdir()
    rows = [{"prompt": f"What comes after {n}?\nA: {n + 1}\nB: {n + 2}", "response": "[A]", "system": ""} for n in range(24)]
    (data / "ARC-e_train.json").write_text(json.dumps(rows))
    teachers = [*TEACHERS, "--data-dir", str(data)]
    assert main(["teachers", *teachers, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "llgbm_ext", "teachers", *teachers, "--out", str(out)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / ".state" / "group_000" / "state.json"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:  # a training state is saved: kill
        if state.is_file():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert 0 < json.loads(state.read_text())["step"] < 14, "the run finished before it was killed"

    assert main(["teachers", *teachers, "--out", str(out)]) == 0  # continues from the saved state

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".state" not in p.parts}

    whole, resumed = files(tmp_path / "whole"), files(out)
    assert whole.keys() == resumed.keys() and len(whole) > 10
    assert [str(k) for k in whole if whole[k] != resumed[k]] == []
