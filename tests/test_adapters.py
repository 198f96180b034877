"""Adapter files: PEFT directories and DnD flat files, validation errors, atomic writes, PEFT loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from llgbm_ext.errors import AdapterError
from llgbm_ext.lora.adapters import (
    canonical_key,
    list_adapters,
    load_adapter,
    save_dnd_checkpoint,
    save_peft_adapter,
    validate_state_dict,
)
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout, peft_key

LAYOUT = get_layout("tiny")
KEY = peft_key(2, "k_proj", "B")


@pytest.fixture
def state_dict():
    return state_dict_from_factors(random_factors(LAYOUT, std=0.05), LAYOUT)


def test_peft_dir_round_trip(state_dict, tmp_path):
    out = save_peft_adapter(state_dict, tmp_path / "a", LAYOUT, base_model_name_or_path="tiny", extra_json={"prompts.json": ["x"]})
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert set(config["target_modules"]) == set(LAYOUT.targets)
    assert json.loads((out / "prompts.json").read_text()) == ["x"]
    adapter = load_adapter(out, LAYOUT)
    assert adapter.config["r"] == 8
    assert all(torch.equal(adapter.state_dict[k], v) for k, v in state_dict.items())


def test_dnd_flat_round_trip_and_listing(state_dict, tmp_path):
    for step in (10, 2, 1):
        save_dnd_checkpoint(state_dict, tmp_path / "ARC-e" / f"{step}.safetensors", LAYOUT, dtype=torch.bfloat16)
    files = list_adapters(tmp_path / "ARC-e")
    assert [p.name for p in files] == ["1.safetensors", "2.safetensors", "10.safetensors"]  # numeric order
    adapter = load_adapter(files[0], LAYOUT)
    assert adapter.config is None and adapter.state_dict[KEY].dtype == torch.bfloat16
    assert torch.equal(adapter.state_dict[KEY], state_dict[KEY].bfloat16())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ARC-e"]  # no temp files left behind


def test_keys_are_canonicalised(state_dict, tmp_path):
    assert canonical_key("model.layers.0.mlp.up_proj.lora_A.default.weight") == peft_key(0, "up_proj", "A")
    short = {k.replace("base_model.model.", "").replace("lora_A.", "lora_A.default."): v for k, v in state_dict.items()}
    save_file(short, str(tmp_path / "0.safetensors"))
    assert load_adapter(tmp_path / "0.safetensors", LAYOUT).state_dict.keys() == state_dict.keys()


def _expect(state_dict, tmp_path, match):
    save_file({k: v.clone() for k, v in state_dict.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdapterError, match=match) as info:
        load_adapter(tmp_path / "bad.safetensors", LAYOUT)
    message = str(info.value)
    assert "\n" not in message and "bad.safetensors" in message
    return message


def test_missing_and_extra_keys(state_dict, tmp_path):
    missing = dict(state_dict)
    del missing[KEY]
    assert KEY in _expect(missing, tmp_path, "missing key")
    extra = {**state_dict, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128)}
    _expect(extra, tmp_path, "unexpected key base_model.model.lm_head")


def test_other_geometry_and_rank(state_dict, tmp_path):
    other = state_dict_from_factors(random_factors(get_layout("tiny", rank=4)), get_layout("tiny", rank=4))
    assert "rank 4 vs 8" in _expect(other, tmp_path, "has shape")
    six_layers = {**state_dict, **{k.replace("layers.3.", "layers.5."): v for k, v in state_dict.items() if "layers.3." in k}}
    assert "adapter has 6 layers, layout 'tiny' expects 4" in _expect(six_layers, tmp_path, "unexpected key")


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_values(state_dict, tmp_path, bad, word):
    broken = dict(state_dict)
    broken[KEY] = broken[KEY].clone()
    broken[KEY][0, 0] = bad
    assert KEY in _expect(broken, tmp_path, f"contains {word}")
    with pytest.raises(AdapterError, match=word):
        save_peft_adapter(broken, tmp_path / "never", LAYOUT)
    assert not (tmp_path / "never").exists()


def test_truncated_and_corrupt_files(state_dict, tmp_path):
    save_dnd_checkpoint(state_dict, tmp_path / "1.safetensors", LAYOUT)
    data = (tmp_path / "1.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    for name in ("trunc.safetensors", "garbage.safetensors"):
        with pytest.raises(AdapterError, match=f"{name}: not a readable safetensors file") as info:
            load_adapter(tmp_path / name, LAYOUT)
        assert "\n" not in str(info.value)


def test_not_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter"):
        load_adapter(tmp_path / "nope", LAYOUT)
    (tmp_path / "dir").mkdir()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        load_adapter(tmp_path / "dir", LAYOUT)
    (tmp_path / "dir" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(tmp_path / "dir", LAYOUT)


def test_config_rank_mismatch_and_bad_json(state_dict, tmp_path):
    out = save_peft_adapter(state_dict, tmp_path / "a", LAYOUT)
    (out / "adapter_config.json").write_text(json.dumps({"r": 16}))
    with pytest.raises(AdapterError, match="r = 16"):
        load_adapter(out, LAYOUT)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(out, LAYOUT)


def test_failed_write_keeps_previous_adapter(state_dict, tmp_path, monkeypatch):
    out = save_peft_adapter(state_dict, tmp_path / "a", LAYOUT)
    before = (out / "adapter_model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("llgbm_ext.lora.adapters.save_file", explode)
    with pytest.raises(OSError):
        save_peft_adapter({k: v * 2 for k, v in state_dict.items()}, out, LAYOUT)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_saved_adapter_loads_in_peft_and_changes_output(state_dict, tmp_path, tiny_model_dir):
    from peft import PeftModel

    from llgbm_ext.models.registry import load_base_model

    out = save_peft_adapter(state_dict, tmp_path / "a", LAYOUT, base_model_name_or_path=str(tiny_model_dir))
    base, _ = load_base_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        plain = base(ids).logits
        peft_model = PeftModel.from_pretrained(base, str(out))
        adapted = peft_model(ids).logits
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(state_dict)
    assert (adapted - plain).abs().max() > 1e-3


def test_validate_rejects_integer_tensors(state_dict):
    broken = {**state_dict, KEY: state_dict[KEY].to(torch.int32)}
    with pytest.raises(AdapterError, match="dtype torch.int32"):
        validate_state_dict(broken, LAYOUT, source="x.safetensors")
