"""The shipped ``tiny``: its recipe and checksum, resolving without pretraining, a damaged copy, ``--rebuild``."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from llgbm_ext.cli import main
from llgbm_ext.errors import ModelError
from llgbm_ext.models import pretrain, shipped
from llgbm_ext.models.pretrain import PRETRAIN_VERSION, PretrainConfig, packed_rows, pretrained_model_dir
from llgbm_ext.models.registry import load_base_model, resolve_base_model
from llgbm_ext.models.shipped import SHIPPED_DIR, file_sha256, weight_differences
from llgbm_ext.models.tiny import TINY_VERSION


def _refuse(*args, **kwargs):
    raise AssertionError("pretraining must not run")


@pytest.fixture
def no_pretraining(monkeypatch, tmp_path):
    """An empty cache, and any pretraining fails the test."""
    monkeypatch.setenv("LLGBM_CACHE", str(tmp_path / "cache"))
    for name in ("build_pretrained_model", "pretrain", "_train"):
        monkeypatch.setattr(pretrain, name, _refuse)
    return tmp_path / "cache"


@pytest.fixture
def shipped_copy(monkeypatch, tmp_path):
    """A copy of the shipped model, resolved as ``tiny`` (so that a broken rebuild cannot touch the real one)."""
    copy = shutil.copytree(SHIPPED_DIR, tmp_path / "tiny")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", copy)
    return copy


@pytest.fixture
def damaged_copy(shipped_copy):
    """The copy with one byte of its weights flipped."""
    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    return weights


def test_shipped_model_matches_its_recipe():
    recipe = json.loads((SHIPPED_DIR / "llgbm_model.json").read_text())
    assert (recipe["version"], recipe["pretrain_version"]) == (TINY_VERSION, PRETRAIN_VERSION)
    assert recipe["pretrain"] == asdict(PretrainConfig()) and recipe["torch"]
    assert file_sha256(SHIPPED_DIR / "model.safetensors") == recipe["sha256"]
    assert sum(t.numel() for t in load_file(SHIPPED_DIR / "model.safetensors").values()) < 1_100_000


def test_shipped_files_are_readable_by_transformers_4_49():
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    tokenizer = json.loads((SHIPPED_DIR / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in tokenizer  # a list there breaks transformers 4.49
    assert tokenizer["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]


def test_resolving_tiny_reads_the_shipped_model_and_never_pretrains(tiny_model, no_pretraining):
    before = {p.name: p.stat().st_mtime_ns for p in SHIPPED_DIR.iterdir()}
    assert resolve_base_model("tiny") == SHIPPED_DIR
    assert pretrain.ensure_pretrained_model(PretrainConfig()) == SHIPPED_DIR
    model, tokenizer = load_base_model("tiny")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    embeddings = load_file(SHIPPED_DIR / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    raw, raw_tokenizer = tiny_model
    assert tokenizer.get_vocab() == raw_tokenizer.get_vocab() and model.config.vocab_size == raw.config.vocab_size
    batch = packed_rows(tokenizer, PretrainConfig(steps=1, batch_size=8, seq_len=32))
    with torch.no_grad():  # pretrained: far below the random initialisation's ln(vocab)
        assert model(input_ids=batch, labels=batch).loss < raw(input_ids=batch, labels=batch).loss - 3
    assert {p.name: p.stat().st_mtime_ns for p in SHIPPED_DIR.iterdir()} == before  # only read
    assert not no_pretraining.exists() or not any(no_pretraining.iterdir())  # nothing copied into the cache


def test_damaged_weights_are_a_one_line_error(damaged_copy, capsys):
    with pytest.raises(ModelError, match=r"model\.safetensors: sha256 [0-9a-f]{16}… is not the recorded") as error:
        resolve_base_model("tiny")
    assert str(damaged_copy) in str(error.value) and "\n" not in str(error.value)
    assert main(["model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(damaged_copy) in err
    damaged_copy.unlink()
    with pytest.raises(ModelError, match="model.safetensors: missing from the installed package"):
        resolve_base_model("tiny")


def _copy_shipped(out_dir, change=None):
    """A fake rebuild: the shipped files, with ``change`` applied to the weights."""
    shutil.copytree(SHIPPED_DIR, out_dir, dirs_exist_ok=True)
    if change:
        tensors = load_file(out_dir / "model.safetensors")
        change(tensors)
        save_file(tensors, out_dir / "model.safetensors")
    return out_dir


def _rebuild(monkeypatch, tmp_path, capsys, change=None):
    """Run ``llgbm model tiny --rebuild`` with a fake builder against a copy of the shipped model; its output lines."""
    monkeypatch.setenv("LLGBM_CACHE", str(tmp_path / "cache"))
    configs = []

    def fake_build(out_dir, config):
        configs.append(config)
        return _copy_shipped(out_dir, change)

    monkeypatch.setattr(pretrain, "build_pretrained_model", fake_build)
    capsys.readouterr()
    assert main(["model", "tiny", "--rebuild"]) == 0
    assert configs == [PretrainConfig()]  # the shipped recipe
    recorded = shipped.shipped_recipe()["sha256"]
    assert file_sha256(shipped.SHIPPED_DIR / "model.safetensors") == recorded  # never replaced
    assert (pretrained_model_dir() / "model.safetensors").is_file()
    return capsys.readouterr().out.splitlines()


def test_rebuild_reports_identical_weights(shipped_copy, monkeypatch, tmp_path, capsys):
    lines = _rebuild(monkeypatch, tmp_path, capsys)
    tensors = load_file(SHIPPED_DIR / "model.safetensors")
    rows = [line for line in lines if "max |Δ| = " in line and line.startswith("  ")]
    assert len(rows) == len(tensors) and all(row.endswith("max |Δ| = 0") for row in rows)
    assert lines[-1] == "shipped vs rebuilt: identical"


def test_rebuild_reports_how_much_weights_differ(shipped_copy, monkeypatch, tmp_path, capsys):
    def nudge(tensors):
        tensors["model.norm.weight"][3] += 0.25

    lines = _rebuild(monkeypatch, tmp_path, capsys, nudge)
    changed = [line.split()[0] for line in lines if line.startswith("  ") and not line.endswith("= 0")]
    assert changed == ["model.norm.weight"]
    assert lines[-1] == "shipped vs rebuilt: differs (max |Δ| = 0.25)"


def test_weight_differences_flag_missing_and_reshaped_tensors(tmp_path):
    def drop_and_reshape(tensors):
        del tensors["model.norm.weight"]
        tensors["model.layers.0.input_layernorm.weight"] = tensors["model.layers.0.input_layernorm.weight"][:-1].clone()

    other = _copy_shipped(tmp_path / "other", drop_and_reshape)
    differences = weight_differences(SHIPPED_DIR, other)
    assert {k for k, v in differences.items() if v == float("inf")} == {
        "model.norm.weight", "model.layers.0.input_layernorm.weight"}
    assert max(v for v in differences.values() if v != float("inf")) == 0


def test_rebuild_is_for_tiny_only(capsys):
    assert main(["model", "tiny-random", "--rebuild"]) == 2
    assert "--rebuild: only 'tiny' is built from a recipe" in capsys.readouterr().err
