"""Integration tests of the DnD plugin against the real DnD code in dnd_repo/ (skipped when it is empty).

The CPU smoke task (workspace_overrides/main/tasks/llgbm_smoke) runs DnD's own FullCond dataset,
HyperConvDecoderModel_FullCond, WarmupScheduler and training loop, with two fork-started DataLoader
workers, in a temporary checkout whose ``workspace/dnd`` is dnd_repo's (and whose folder is not named
Drag-and-Drop-LLMs, so the runner's root handling is exercised). Runs are in-process with one
intra-op thread: on a shared 2-core machine more threads only wait on each other.
"""

from __future__ import annotations

import math
import os
import py_compile
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, requires_dnd
from safetensors.torch import load_file, save_file

from llgbm_ext.cli.dnd import overlay
from llgbm_ext.dnd.config import load_plugin_config
from llgbm_ext.dnd.runner import ROOT_NAME, run_dnd_script
from llgbm_ext.dnd.smoke import ensure_smoke_data

pytestmark = requires_dnd

DND = REPO_ROOT / "dnd_repo"
PATCHES = REPO_ROOT / "patches"
SMOKE = Path("workspace/main/tasks/llgbm_smoke/train_tinylora_Smoke.py")
LINE = re.compile(r"step:(\d+) Loss: (\S+)(?: \| llgbm (.*))?$")


def make_checkout(root: Path) -> Path:
    """A DnD checkout at ``root`` using dnd_repo's workspace/dnd, with the overrides laid over it."""
    (root / "workspace").mkdir(parents=True)
    (root / "workspace" / "dnd").symlink_to(DND / "workspace" / "dnd", target_is_directory=True)
    overlay(REPO_ROOT / "workspace_overrides", root)
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return make_checkout(tmp_path_factory.mktemp("dnd") / "checkout")


@pytest.fixture
def smoke_env(checkout, monkeypatch):
    monkeypatch.setenv("LLGBM_SMOKE_STEPS", "2")
    monkeypatch.setenv("LLGBM_SMOKE_WORKERS", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield checkout
    torch.set_num_threads(threads)


def logged_steps(out: str) -> list[tuple[int, float, dict[str, float]]]:
    steps = []
    for line in out.splitlines():
        if m := LINE.match(line):
            terms = dict(re.findall(r"(\w+): (\S+)", m.group(3) or ""))
            steps.append((int(m.group(1)), float(m.group(2)), {k: float(v) for k, v in terms.items()}))
    return steps


def saved_state(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "tinylora__Smoke.pth", weights_only=True)


def run_smoke(root: Path, monkeypatch, config=None, hooks: bool = True) -> dict:
    """``python -m llgbm_ext.dnd.runner`` from DnD's workspace/main (DnD's scripts chdir to the root)."""
    monkeypatch.chdir(root / "workspace" / "main")
    return run_dnd_script(f"tasks/llgbm_smoke/{SMOKE.name}", [], config, hooks=hooks)


def smoke_config(*overrides: str):
    return load_plugin_config(REPO_ROOT / "workspace_overrides" / "llgbm" / "configs" / "smoke.yaml", list(overrides))


# --- patches ---------------------------------------------------------------------------------------

def pristine_main(tmp_path: Path) -> Path:
    work = tmp_path / "dnd"
    for part in ("tasks", "generate"):
        shutil.copytree(DND / "workspace" / "main" / part, work / "workspace" / "main" / part,
                        ignore=shutil.ignore_patterns("llgbm_smoke"))
    shutil.copy(DND / "workspace" / "main" / "launch_multi.sh", work / "workspace" / "main")
    return work


def git_apply(work: Path, *patches: Path, check: bool = False) -> None:
    for patch in patches:
        subprocess.run(["git", "apply", *(["--check"] if check else []), str(patch)], cwd=work, check=True,
                       capture_output=True)


def test_patches_apply_alone_with_the_flag_and_together(tmp_path):
    flag = PATCHES / "llgbm-flag.patch"
    fixes = sorted(PATCHES.glob("fix-*.patch"))
    work = pristine_main(tmp_path)
    for patch in [flag, *fixes]:
        git_apply(work, patch, check=True)
    git_apply(work, flag)
    for patch in fixes:
        git_apply(work, patch, check=True)
    git_apply(work, *fixes)
    for script in (work / "workspace" / "main").glob("*/**/*.py"):
        py_compile.compile(str(script), cfile=str(tmp_path / "compiled.pyc"), doraise=True)
    text = (work / "workspace" / "main" / "tasks" / "common_sense_reasoning" / "train_qwen0.5lora_ARC-e.py").read_text()
    assert "NUM_PROCESSES" not in text and "Drag-and-Drop-LLMs" not in text
    assert text.index("        scheduler.step(batch_idx)\n        if accelerator.is_main_process:") > 0


def test_flag_patch_keeps_upstream_command_and_adds_the_runner(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text('#!/bin/sh\necho "$@"\n')
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    upstream = pristine_main(tmp_path / "up") / "workspace" / "main"
    patched = pristine_main(tmp_path / "patched") / "workspace" / "main"
    git_apply(patched.parents[1], PATCHES / "llgbm-flag.patch")

    def launch(folder: Path, *args: str) -> str:
        out = subprocess.run(["bash", "launch_multi.sh", "tasks/x/train_a_B.py", "4", *args], cwd=folder, env=env,
                             check=True, capture_output=True, text=True).stdout
        return re.sub(r"--main_process_port=\d+", "--main_process_port=P", out)

    assert launch(patched) == launch(upstream) == launch(patched, "--other") != ""
    with_flag = launch(patched, "--llgbm", "--llgbm-config", "c.yaml", "--set", "lambda_delta=0.2")
    assert with_flag == launch(upstream).replace(
        "tasks/x/train_a_B.py", "-m llgbm_ext.dnd.runner --llgbm-config c.yaml --set lambda_delta=0.2 tasks/x/train_a_B.py")


# --- the smoke task through the runner -----------------------------------------------------------------

def test_delta_term_trains_hyperconv_and_is_logged(smoke_env, capsys, monkeypatch):
    """λw = 0, λd = 1: DnD's logged loss is the delta loss, both terms appear on DnD's log line, and
    every HyperConv parameter gets a gradient through the delta term alone."""
    scope = run_smoke(smoke_env, monkeypatch, smoke_config("lambda_weight=0", "lambda_delta=1"))
    steps = logged_steps(capsys.readouterr().out)
    assert [s[0] for s in steps] == [0, 1, 2]
    for _, loss, terms in steps:
        assert set(terms) >= {"L", "L_weight", "L_delta", "cos_delta"}
        assert all(math.isfinite(v) for v in terms.values())
        assert loss == pytest.approx(terms["L_delta"], abs=2e-6) and terms["L_weight"] > 0
    decoder = scope["model"].model  # DnD's HyperConvDecoder
    grads = {name: p.grad for name, p in decoder.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]


def run_plain(root: Path, alias_dir: Path, monkeypatch) -> dict:
    """The script as `python SCRIPT` runs it from a Drag-and-Drop-LLMs folder: no llgbm_ext involved."""
    link = alias_dir / ROOT_NAME
    if not link.exists():
        link.symlink_to(root, target_is_directory=True)
    script = link / SMOKE
    monkeypatch.setenv("NUM_PROCESSES", "1")
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[0] = [str(script)], str(script.parent)
    try:
        return runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        monkeypatch.delenv("NUM_PROCESSES")


def test_without_hooks_training_is_upstream_bit_for_bit(smoke_env, tmp_path, capsys, monkeypatch):
    root = smoke_env
    run_plain(root, tmp_path, monkeypatch)
    plain_log, plain_state = logged_steps(capsys.readouterr().out), saved_state(root)
    run_smoke(root, monkeypatch, hooks=False)
    runner_log, runner_state = logged_steps(capsys.readouterr().out), saved_state(root)
    assert plain_log and runner_log == plain_log
    assert plain_state.keys() == runner_state.keys()
    assert all(torch.equal(plain_state[k], runner_state[k]) for k in plain_state)

    # with the hooks and λd = 0 the objective is DnD's own (TokenMSELoss sums in another order)
    run_smoke(root, monkeypatch, smoke_config("lambda_delta=0"))
    hooked_log, hooked_state = logged_steps(capsys.readouterr().out), saved_state(root)
    assert [s[0] for s in hooked_log] == [s[0] for s in plain_log]
    for (_, ours, terms), (_, theirs, _) in zip(hooked_log, plain_log):
        assert ours == pytest.approx(theirs, abs=2e-6) and "L_delta" not in terms
    for key in plain_state:
        torch.testing.assert_close(hooked_state[key], plain_state[key], rtol=1e-4, atol=1e-5)


def smoke_on_two_processes(root: Path, cache: Path, port: int) -> subprocess.CompletedProcess:
    """torchrun with 2 CPU processes (gloo, DDP), as accelerate's multi-process launcher starts them;
    ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets."""
    env = {**os.environ, "LLGBM_SMOKE_STEPS": "2", "LLGBM_SMOKE_WORKERS": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "LLGBM_CACHE": str(cache)}
    env.pop("NUM_PROCESSES", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "llgbm_ext.dnd.runner", "--llgbm-config", "../llgbm/configs/smoke.yaml",
               f"tasks/llgbm_smoke/{SMOKE.name}"]
    return subprocess.run(command, check=False, cwd=root / "workspace" / "main", env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_processes_with_fork_workers(checkout, tmp_path):
    """Rank 0 alone fills the DeltaCache and prints DnD's log lines."""
    done = smoke_on_two_processes(checkout, tmp_path / "cache", 29517)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = logged_steps(done.stdout)
    assert [s[0] for s in steps] == [0, 1, 2] and all("L_delta" in s[2] for s in steps)
    manifest = (tmp_path / "cache" / "delta_cache" / "manifest.json").read_text()
    assert manifest.count('"adapter_id"') == 12  # 2 training tasks x 6 steps, computed once by rank 0


def test_two_processes_stop_together_on_a_diverged_teacher(tmp_path):
    """One training checkpoint's weights overflow, so its Δ is not finite: whichever rank computes it,
    both ranks end with the same one-line error naming the file (none waits at a collective)."""
    root = make_checkout(tmp_path / "checkout")
    bad = ensure_smoke_data(root) / "checkpoints" / "add" / "3.safetensors"
    save_file({k: v * 1e20 for k, v in load_file(str(bad)).items()}, str(bad))
    done = smoke_on_two_processes(root, tmp_path / "cache", 29518)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("llgbm_ext.dnd.runner: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], done.stderr[-3000:]
    assert "checkpoints/add/3.safetensors: its delta teacher targets are not finite" in errors[0]
