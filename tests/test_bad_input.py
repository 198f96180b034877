"""Bad input through every subcommand: a non-zero exit, one line on stderr naming the file (or key,
argument) and what is wrong, no traceback unless --debug, and nothing half-written.

Each case is a row of CASES: the command line, the fragments its error line must contain, and how
to check that its output holds nothing half-written. A full disk is simulated by replacing one
write function with one that raises what the real call raises on a full disk (measured on a
64 KiB tmpfs: Python's write an OSError with errno 28 and no file name, safetensors a
SafetensorError "... (os error 28)"); where the machine lets us mount a tmpfs in a private mount
namespace, the real thing is tested too.
"""

import errno
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.data.teacher_set import write_manifest
from llgbm_ext.delta.cache import DeltaCache
from llgbm_ext.errors import LLGBMError
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout, layout_from_config

TINY = get_layout("tiny")
TRAIN = ["encoder.kind=base-model", "encoder.model=tiny", "generator.kind=simple",
         "generator.embed_dim=128", "device=cpu", "loss.mode=weight_only", "steps=1", "batch_size=2"]


def _adapter(layout=TINY, seed=0) -> dict[str, torch.Tensor]:
    return state_dict_from_factors(random_factors(layout, generator=torch.Generator().manual_seed(seed), std=0.05), layout)


def write_task_files(folder: Path, records: int = 12) -> Path:
    """A small valid DnD multiple-choice task (arc_e): train and test split."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"What comes after {n}?\nA: {n + 1}\nB: {n + 2}", "response": "[A]", "system": ""}
            for n in range(records)]
    for split in ("train", "test"):
        (folder / f"ARC-e_{split}.json").write_text(json.dumps(rows))
    return folder


def _replace_weights(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model_dir) -> SimpleNamespace:
    """Every bad file once, beside good ones and a trained run."""
    root = tmp_path_factory.mktemp("bad")
    b = SimpleNamespace(root=root)
    good = _adapter()
    b.good = save_peft_adapter(good, root / "good", TINY, base_model_name_or_path="tiny")

    b.corrupt = root / "corrupt"
    b.corrupt.mkdir()
    (b.corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    b.truncated = shutil.copytree(b.good, root / "truncated")
    weights = (b.truncated / "adapter_model.safetensors").read_bytes()
    (b.truncated / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    b.dnd_folder = root / "dnd" / "ARC-e"
    save_dnd_checkpoint(good, b.dnd_folder / "0.safetensors", TINY)
    flat = (b.dnd_folder / "0.safetensors").read_bytes()
    (b.dnd_folder / "1.safetensors").write_bytes(flat[:-100])

    rank4 = get_layout("tiny", rank=4)
    b.rank4 = save_peft_adapter(_adapter(rank4), root / "rank4", rank4, base_model_name_or_path="tiny")
    narrow = layout_from_config(dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2), rank=8)
    b.narrow = save_peft_adapter(_adapter(narrow), root / "narrow", narrow, base_model_name_or_path="other")

    key = next(iter(good))
    b.nan = _replace_weights(shutil.copytree(b.good, root / "nan"), {**good, key: good[key].clone().fill_(float("nan"))})
    b.inf = _replace_weights(shutil.copytree(b.good, root / "inf"), {**good, key: good[key].clone().fill_(float("inf"))})
    b.nan_tokens = root / "nan_tokens.safetensors"
    save_file({"tokens": torch.full((TINY.num_tokens, *TINY.token_size), float("nan"))}, str(b.nan_tokens))
    b.truncated_tokens = root / "truncated_tokens.safetensors"
    save_file({"tokens": torch.zeros(TINY.num_tokens, *TINY.token_size)}, str(b.truncated_tokens))
    b.truncated_tokens.write_bytes(b.truncated_tokens.read_bytes()[:1000])

    b.config_list = shutil.copytree(b.good, root / "config_list")
    (b.config_list / "adapter_config.json").write_text("[8, 16]")
    b.empty_probes = root / "empty_probes.json"
    b.empty_probes.write_text("")
    b.no_probes = root / "no_probes.json"
    b.no_probes.write_text("[]")
    b.probes_schema = root / "probes_schema.json"
    b.probes_schema.write_text(json.dumps({"probes": 3}))
    b.prompts_schema = root / "prompts_schema.json"
    b.prompts_schema.write_text(json.dumps({"task": "x", "prompts": [1, 2]}))

    b.data = write_task_files(root / "data")
    b.empty_data = root / "empty_data"
    b.empty_data.mkdir()
    (b.empty_data / "ARC-e_test.json").write_text("[]")
    (b.empty_data / "ARC-e_train.json").write_text("[]")
    b.schema_data = root / "schema_data"
    b.schema_data.mkdir()
    (b.schema_data / "ARC-e_test.json").write_text(json.dumps([{"prompt": "Which?\nA: x\nB: y", "answer": "[A]"}]))

    b.model = root / "model"
    b.model.mkdir()
    (b.model / "config.json").write_text((tiny_model_dir / "config.json").read_text())

    b.teachers = write_fake_teachers(root / "teachers", per_task=1)
    b.bad_teachers = shutil.copytree(b.teachers, root / "bad_teachers")
    (b.bad_teachers / "add_2" / "add_2_000" / "adapter_model.safetensors").write_bytes(weights[:100])
    b.schema_teachers = root / "schema_teachers"
    b.schema_teachers.mkdir()
    (b.schema_teachers / "manifest.json").write_text(json.dumps({"adapters": "all of them"}))
    b.promptless_teachers = root / "promptless_teachers"
    save_peft_adapter(good, b.promptless_teachers / "t" / "t_000", TINY, base_model_name_or_path="tiny")
    write_manifest(b.promptless_teachers, "tiny", TINY, {"t": {"kind": "exact", "family": "fake", "prompts": []}},
                   [{"name": "t_000", "task": "t", "path": "t/t_000", "step": 0}])

    b.run = root / "run"  # a trained generator; its copy "broken_run" has a truncated checkpoint
    assert main(["train", "--no-progress", f"data.teachers={b.teachers}", f"out_dir={b.run}", *TRAIN]) == 0
    b.broken_run = shutil.copytree(b.run, root / "broken_run")
    checkpoint = b.broken_run / "checkpoints" / "step_0000001" / "trainable.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    return b


# --- what "nothing half-written" means for each kind of output ---------------------------------------
def absent(b, out: Path) -> bool:
    return not out.exists()


def cache_intact(b, out: Path) -> bool:
    """Whatever a cache holds reads back intact (no record is corrupt) and no temporary file is left."""
    problems = DeltaCache(out).verify() if out.exists() else []
    return not [p for p in problems if "dropped" in p or ".tmp" in p]


def no_new_checkpoint(b, out: Path) -> bool:
    root = out / "checkpoints"
    return not root.exists() or sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == []


def broken_run_unchanged(b, out: Path) -> bool:
    return sorted(p.name for p in (b.broken_run / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def _full_disk_python_write(monkeypatch):
    """np.save (through file.write) on a full disk: OSError(ENOSPC) without a file name."""
    def write_fails(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", write_fails)


def _full_disk_safetensors(monkeypatch, module):
    def save_file_fails(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(module, "save_file", save_file_fails)


def _checkpoint_module():
    import llgbm_ext.training.checkpoint as checkpoint

    return checkpoint


def _safetensors_torch():
    import safetensors.torch

    return safetensors.torch


NO_SPACE = "No space left on device"
READ_ERROR = "not a readable safetensors file"


# command lines, by subcommand
def encode(adapter, o):
    return ["tokens", "encode", "--layout", "tiny", adapter, o]


def decode(tokens, o):
    return ["tokens", "decode", "--layout", "tiny", tokens, o]


def deltas(o, *adapters, base="tiny", options=()):
    return ["deltas", "--base-model", base, *options, "--out", o, "--adapters", *adapters]


def evaluate(b, o, *options, base="tiny", data=None):
    return ["eval", "--base-model", base, "--data-dir", data or b.data, "--tasks", "arc_e", "--out", o, "--no-progress",
            *options]


def train(o, teachers, *overrides):
    return ["train", "--no-progress", f"data.teachers={teachers}", f"out_dir={o}", *TRAIN, *overrides]


def teachers(b, o, base="tiny", data=None):
    return ["teachers", "--base-model", base, "--data-dir", data or b.data, "--tasks", "arc_e", "--out", o, "--no-progress"]


@dataclass(frozen=True)
class Case:
    argv: Callable  # (bad files, output path) -> command line
    fragments: tuple[str, ...]  # what the error line must contain
    intact: Callable = absent  # (bad files, output path) -> nothing half-written
    full_disk: Callable | None = None  # installs writes that fail as on a full disk


CASES = {
    # corrupt and truncated safetensors
    "tokens-corrupt-adapter": Case(lambda b, o: encode(b.corrupt, o), ("corrupt/adapter_model.safetensors", READ_ERROR)),
    "tokens-truncated-tokens": Case(lambda b, o: decode(b.truncated_tokens, o), ("truncated_tokens.safetensors", READ_ERROR)),
    "deltas-corrupt-adapter": Case(lambda b, o: deltas(o, b.good, b.corrupt, options=("--layout", "tiny")),
                                   ("corrupt/adapter_model.safetensors", READ_ERROR), cache_intact),
    "eval-truncated-adapter": Case(lambda b, o: evaluate(b, o, "--adapters", b.truncated),
                                   ("truncated/adapter_model.safetensors", "incomplete metadata")),
    "criterion-weights-truncated": Case(lambda b, o: ["criterion-weights", b.dnd_folder, "--layout", "tiny", "--out", o],
                                        ("ARC-e/1.safetensors", READ_ERROR)),
    "train-corrupt-teacher": Case(lambda b, o: train(o, b.bad_teachers), ("add_2_000/adapter_model.safetensors", READ_ERROR)),
    "generate-truncated-checkpoint": Case(lambda b, o: ["generate", "--generator", b.broken_run, "--task", "x", "--out", o],
                                          ("trainable.safetensors", "unreadable checkpoint file")),
    "train-resume-truncated-checkpoint": Case(lambda b, o: train(b.broken_run, b.teachers)[:2] + ["--resume"]
                                              + train(b.broken_run, b.teachers)[2:],
                                              ("step_0000001/trainable.safetensors", "unreadable checkpoint file"),
                                              broken_run_unchanged),
    # an adapter for another geometry or rank
    "tokens-other-rank": Case(lambda b, o: encode(b.rank4, o),
                              ("rank4/adapter_model.safetensors", "lora_A.weight has shape (4, 128)", "rank 4 vs 8")),
    "deltas-other-geometry": Case(lambda b, o: deltas(o, b.narrow, options=("--layout", "tiny")),
                                  ("narrow/adapter_model.safetensors", "has shape (8, 64)", "other geometry"), cache_intact),
    "eval-other-geometry": Case(lambda b, o: evaluate(b, o, "--adapters", b.narrow),
                                ("narrow/adapter_model.safetensors", "has shape (8, 64)")),
    # NaN / Inf tensors
    "tokens-nan-adapter": Case(lambda b, o: encode(b.nan, o), ("nan/adapter_model.safetensors", "contains NaN values")),
    "deltas-inf-adapter": Case(lambda b, o: deltas(o, b.inf), ("inf/adapter_model.safetensors", "contains Inf values"),
                               cache_intact),
    "tokens-nan-tokens": Case(lambda b, o: decode(b.nan_tokens, o), ("nan_tokens.safetensors", "non-finite")),
    # missing prompts.json, wrong JSON schema
    "generate-missing-prompts": Case(lambda b, o: ["generate", "--generator", b.run, "--prompts", b.root / "prompts.json",
                                                   "--out", o], ("prompts.json", "no such prompts file")),
    "generate-prompts-schema": Case(lambda b, o: ["generate", "--generator", b.run, "--prompts", b.prompts_schema, "--out", o],
                                    ("prompts_schema.json", "expected a non-empty list of prompt strings")),
    "tokens-adapter-config-schema": Case(lambda b, o: encode(b.config_list, o),
                                         ("config_list/adapter_config.json", "expected a JSON object")),
    "train-manifest-schema": Case(lambda b, o: train(o, b.schema_teachers),
                                  ("schema_teachers/manifest.json", "malformed manifest")),
    "eval-task-schema": Case(lambda b, o: evaluate(b, o, data=b.schema_data),
                             ("ARC-e_test.json", "record 0", "missing 'response'")),
    "deltas-probes-schema": Case(lambda b, o: deltas(o, b.good, options=("--probes", b.probes_schema)),
                                 ("probes_schema.json", "expected a list of probe strings")),
    "train-unknown-config-key": Case(lambda b, o: train(o, b.teachers, "loss.lambda=1"), ("lambda", "unknown key")),
    # empty task data
    "eval-empty-test-split": Case(lambda b, o: evaluate(b, o, data=b.empty_data), ("ARC-e_test.json", "no records")),
    "data-info-empty": Case(lambda b, o: ["data", "info", b.empty_data], ("ARC-e_", "no records")),
    "teachers-empty-train-split": Case(lambda b, o: teachers(b, o, data=b.empty_data), ("ARC-e_train.json", "no records")),
    "train-task-without-prompts": Case(lambda b, o: train(o, b.promptless_teachers),
                                       ("promptless_teachers/manifest.json", "task 't' has no condition prompts")),
    # an empty probe file
    "deltas-empty-probe-file": Case(lambda b, o: deltas(o, b.good, options=("--probes", b.empty_probes)),
                                    ("empty_probes.json", "empty probe file")),
    "deltas-no-probes": Case(lambda b, o: deltas(o, b.good, options=("--probes", b.no_probes)),
                             ("no_probes.json", "the probe list is empty")),
    "eval-empty-probe-file": Case(lambda b, o: evaluate(b, o, "--adapters", b.good, "--probes", b.empty_probes),
                                  ("empty_probes.json", "empty probe file")),
    # an unknown layout name
    "tokens-unknown-layout": Case(lambda b, o: ["tokens", "encode", "--layout", "qwen9", b.good, o],
                                  ("unknown layout 'qwen9'",)),
    "deltas-unknown-layout": Case(lambda b, o: deltas(o, b.good, options=("--layout", "qwen9")), ("unknown layout 'qwen9'",)),
    "criterion-weights-unknown-layout": Case(lambda b, o: ["criterion-weights", b.dnd_folder, "--layout", "qwen9", "--out", o],
                                             ("unknown layout 'qwen9'",)),
    # a base-model directory with missing files
    "model-missing-files": Case(lambda b, o: ["model", b.model], ("model", "missing model.safetensors", "tokenizer")),
    "deltas-model-missing-files": Case(lambda b, o: deltas(o, b.good, base=b.model), ("model", "missing model.safetensors")),
    "eval-model-missing-files": Case(lambda b, o: evaluate(b, o, base=b.model), ("model", "missing model.safetensors")),
    "teachers-model-missing-files": Case(lambda b, o: teachers(b, o, base=b.model), ("model", "missing model.safetensors")),
    # a full disk
    "deltas-disk-full": Case(lambda b, o: deltas(o, b.good), ("base_activation.npy", NO_SPACE), cache_intact,
                             _full_disk_python_write),
    "train-disk-full-checkpoint": Case(lambda b, o: train(o, b.teachers), ("checkpoints/", NO_SPACE), no_new_checkpoint,
                                       lambda mp: _full_disk_safetensors(mp, _checkpoint_module())),
    "tokens-disk-full": Case(lambda b, o: encode(b.good, o), ("out", NO_SPACE), absent,
                             lambda mp: _full_disk_safetensors(mp, _safetensors_torch())),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line(name, bad, tmp_path, capsys, monkeypatch):
    case, out = CASES[name], tmp_path / "out"
    if case.full_disk is not None:
        case.full_disk(monkeypatch)
    argv = [str(a) for a in case.argv(bad, out)]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llgbm")]  # besides progress bars
    assert code == (1 if case.full_disk else 2), err
    assert len(lines) == 1 and lines[0].startswith(f"llgbm {argv[0]}: error: "), err
    assert err.rstrip().endswith(lines[0])
    for fragment in case.fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert case.intact(bad, out), f"{name}: half-written output in {out}"


@pytest.mark.parametrize("name, error", [("tokens-nan-adapter", LLGBMError), ("deltas-disk-full", OSError)])
def test_debug_shows_the_exception(name, error, bad, tmp_path, monkeypatch):
    case = CASES[name]
    if case.full_disk is not None:
        case.full_disk(monkeypatch)
    with pytest.raises(error):
        main([*(str(a) for a in case.argv(bad, tmp_path / "out")), "--debug"])


# Runs inside a private mount namespace whose DISK is a 64 KiB tmpfs: llgbm train, then llgbm deltas
# with 4 KiB left; stderr of each into <out>/<command>.err, the rest into <out>/result.json.
FULL_DISK = """
import contextlib, json, os, shutil, sys
from pathlib import Path
from llgbm_ext.cli import main
from llgbm_ext.delta.cache import DeltaCache

disk, out, teachers = (Path(a) for a in sys.argv[1:4])
result = {}
for name, argv in (("train", ["train", "--no-progress", f"data.teachers={teachers}", f"out_dir={disk}/run", *sys.argv[4:]]),
                   ("deltas", ["deltas", "--base-model", "tiny", "--adapters", str(teachers), "--out", f"{disk}/cache"])):
    if name == "deltas":
        result["checkpoints"] = sorted(os.listdir(disk / "run" / "checkpoints"))
        shutil.rmtree(disk / "run")
        (disk / "filler").write_bytes(bytes(60 * 1024))  # 4 KiB left: room for one small file
    with open(out / f"{name}.err", "w") as err, contextlib.redirect_stderr(err):
        result[name] = main(argv)
result["verify"] = DeltaCache(disk / "cache").verify()
(out / "result.json").write_text(json.dumps(result))
"""


def _can_mount_tmpfs(target: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {target}"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_real_full_disk_is_one_line_and_leaves_nothing_half_written(bad, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs unshare and mount rights)")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    command = f"mount -t tmpfs -o size=64k tmpfs {disk} && exec {sys.executable} {script} {disk} {tmp_path} {bad.teachers} "
    subprocess.run(["unshare", "-m", "sh", "-c", command + " ".join(TRAIN)], timeout=300, check=True)
    result = json.loads((tmp_path / "result.json").read_text())
    for name, file in (("train", "/run/checkpoints/"), ("deltas", "/cache/")):
        err = (tmp_path / f"{name}.err").read_text()
        lines = [line for line in err.splitlines() if line.startswith("llgbm")]
        assert result[name] == 1 and len(lines) == 1, err
        assert file in lines[0] and NO_SPACE in lines[0] and "Traceback" not in err
    assert [n for n in result["checkpoints"] if not n.startswith(".")] == []  # no visible checkpoint
    assert not [p for p in result["verify"] if "dropped" in p]  # no corrupt cache record
