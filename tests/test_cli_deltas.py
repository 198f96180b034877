"""``llgbm deltas``: cached teacher deltas (hits on re-run, misses on changed probes), summary and plots."""

import json

import numpy as np
import pytest
import torch

from llgbm_ext.cli import main
from llgbm_ext.delta.summary import embed_2d, task_cosines
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout

LAYOUT = get_layout("tiny")


@pytest.fixture
def adapters(tmp_path):
    """Two tasks: 'up' adapters share one direction, 'down' adapters its negative (plus noise)."""
    g = torch.Generator().manual_seed(0)
    shared = state_dict_from_factors(random_factors(LAYOUT, generator=g, std=0.03), LAYOUT)
    for i in range(3):
        noisy = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in shared.items()}
        save_peft_adapter(noisy, tmp_path / "ckpt" / "up" / f"up_{i:03d}", LAYOUT, extra_json={"prompts.json": {"task": "up", "prompts": []}})
        flipped = {k: (-v if ".lora_B." in k else v) for k, v in noisy.items()}
        save_dnd_checkpoint(flipped, tmp_path / "data" / "down" / f"{i}.safetensors", LAYOUT)
    return tmp_path


def test_deltas_cli_caches_and_summarises(adapters, capsys, monkeypatch):
    out = adapters / "deltas"
    argv = ["deltas", "--base-model", "tiny", "--adapters", str(adapters / "ckpt"), str(adapters / "data" / "down"),
            "--out", str(out), "--batch-size", "4", "--summary"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "6 deltas" in text and "mean cosine between tasks" in text
    assert (out / "manifest.json").is_file() and (out / "base_activation.npy").is_file()
    assert (out / "delta_map.png").stat().st_size > 1000 and (out / "delta_cosines.png").stat().st_size > 1000
    assert len(list(out.glob("*.npy"))) == 7  # base activation + 6 adapters
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["contexts"]) == 1
    records = manifest["adapters"]
    tasks = [r["task"] for r in records.values()]
    deltas = np.stack([np.load(out / f"{stem}.npy") for stem in records])  # per probe (6, P, H)
    assert deltas.shape == (6, 5, 128)
    names, matrix = task_cosines(deltas.mean(1), tasks)  # the probe-averaged Δ
    assert names == ["down", "up"] and matrix[0, 1] < min(matrix[0, 0], matrix[1, 1]) - 0.2  # tasks are told apart

    import llgbm_ext.delta.deltas as deltas_module

    def no_compute(*args, **kwargs):
        raise AssertionError("a cached delta was recomputed")

    monkeypatch.setattr(deltas_module.DeltaComputer, "teacher_probe_deltas", no_compute)
    assert main(argv[:-1]) == 0  # second run: every delta is a cache hit
    monkeypatch.undo()
    assert main(argv[:-1] + ["--probes", "domain:math"]) == 0  # another probe set: a new context
    assert len(list(out.glob("*.npy"))) == 14


def test_task_cosines_and_map():
    deltas = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.8, -0.2]])
    names, matrix = task_cosines(deltas, ["a", "a", "b", "b"])
    assert names == ["a", "b"]
    assert matrix[0, 0] > 0.99 and matrix[0, 1] < -0.95 and np.allclose(matrix, matrix.T)
    xy = embed_2d(deltas)
    assert xy.shape == (4, 2) and np.sign(xy[0, 0]) == np.sign(xy[1, 0]) != np.sign(xy[2, 0])


def test_deltas_cli_bad_probe_file(adapters, tmp_path, capsys):
    (tmp_path / "empty.json").write_text("[]")
    argv = ["deltas", "--base-model", "tiny", "--adapters", str(adapters / "ckpt"), "--out", str(tmp_path / "d"),
            "--probes", str(tmp_path / "empty.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "empty.json" in err and len(err.strip().splitlines()) == 1
