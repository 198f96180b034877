"""DnD's criterion weights: the formula (against a direct stacked computation), the file format, the CLI."""

import pickle

import pytest
import torch

from llgbm_ext.cli import main
from llgbm_ext.errors import AdapterError
from llgbm_ext.lora.adapters import save_dnd_checkpoint
from llgbm_ext.lora.criterion_weights import (
    criterion_weights,
    load_criterion_weight,
    mean_criterion_weight,
    save_criterion_weight,
)
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.lora.tokens import lora_to_tokens

LAYOUT = get_layout("tiny")


def _trajectory(folder, steps=5, seed=0):
    """A fake training run: one adapter drifting, with layer 3 moving ten times more than the rest."""
    g = torch.Generator().manual_seed(seed)
    sd = state_dict_from_factors(random_factors(LAYOUT, generator=g), LAYOUT)
    for step in range(steps):
        drift = {k: v + (0.01 if "layers.3." in k else 0.001) * step * torch.randn(v.shape, generator=g) for k, v in sd.items()}
        save_dnd_checkpoint(drift, folder / f"{step}.safetensors", LAYOUT)
    return sorted(folder.iterdir())


def test_weights_follow_dnd_formula(tmp_path):
    files = _trajectory(tmp_path / "task")
    weights = criterion_weights(files, LAYOUT, progress=False)
    from llgbm_ext.lora.adapters import load_adapter

    stacked = torch.stack([lora_to_tokens(load_adapter(f, LAYOUT).state_dict, LAYOUT) for f in files])
    std = stacked.std(dim=0, unbiased=False)  # population std over checkpoints, per element
    expected = std.mean(dim=(-2, -1)) / std.mean()
    assert weights.dtype == torch.float32 and weights.shape == (LAYOUT.num_tokens,)
    assert torch.allclose(weights, expected, rtol=1e-4, atol=1e-6)
    assert abs(weights.mean().item() - 1.0) < 1e-5
    last_layer = slice(3 * LAYOUT.tokens_per_layer, None)
    assert weights[last_layer].mean() > 3 * weights[: LAYOUT.tokens_per_layer].mean()


def test_save_load_mean_and_cli(tmp_path, capsys):
    _trajectory(tmp_path / "data" / "A", seed=1)
    _trajectory(tmp_path / "data" / "B", seed=2)
    assert main(["criterion-weights", str(tmp_path / "data" / "A"), str(tmp_path / "data" / "B"),
                 "--layout", "tiny", "--out", str(tmp_path / "cw")]) == 0
    a = load_criterion_weight(tmp_path / "cw" / "A" / "criterion_weight.pt", LAYOUT)
    b = load_criterion_weight(tmp_path / "cw" / "B" / "criterion_weight.pt", LAYOUT)
    mean = load_criterion_weight(tmp_path / "cw" / "criterion_weight.pt", LAYOUT)
    assert torch.allclose(mean, (a + b) / 2)
    assert torch.equal(mean_criterion_weight([tmp_path / "cw" / "A" / "criterion_weight.pt",
                                              tmp_path / "cw" / "B" / "criterion_weight.pt"]), mean)
    assert sorted(p.name for p in (tmp_path / "data" / "A").iterdir())[0] == "0.safetensors"  # data folder untouched
    assert "mean of 2 folder(s)" in capsys.readouterr().out


def test_bad_weight_files(tmp_path):
    save_criterion_weight(torch.ones(7), tmp_path / "short.pt")
    with pytest.raises(AdapterError, match="7 weights, layout 'tiny' has 152 tokens"):
        load_criterion_weight(tmp_path / "short.pt", LAYOUT)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"not": "a tensor"}))
    with pytest.raises(AdapterError, match="evil.pt: not a criterion weight tensor"):
        load_criterion_weight(tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="no such file"):
        load_criterion_weight(tmp_path / "missing.pt")
