"""The embedded tiny model: deterministic, offline, Qwen2 with grouped-query attention, resolvable as 'tiny'."""

import hashlib
import json

import pytest
import torch

from llgbm_ext.errors import ModelError
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import check_model_dir, load_base_model, resolve_base_model
from llgbm_ext.models.tiny import build_tiny_model


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    build_tiny_model(tmp_path)
    assert _digest(tmp_path) == _digest(tiny_model_dir)


def test_architecture(tiny_model):
    model, tokenizer = tiny_model
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    layout = get_layout("tiny")
    assert config.hidden_size % layout.chunk == 0 and config.intermediate_size % layout.chunk == 0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert len(tokenizer) <= config.vocab_size
    text = "Below is an instruction that describes a task. 12 + 7 = 19"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_resolve_tiny_is_cached(tiny_model_dir):
    assert resolve_base_model("tiny-random") == tiny_model_dir
    assert json.loads((tiny_model_dir / "llgbm_model.json").read_text())["name"] == "tiny"


def test_forward_runs_in_eager_and_sdpa(tiny_model_dir):
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    eager, _ = load_base_model(tiny_model_dir, attn_implementation="eager")
    sdpa, _ = load_base_model(tiny_model_dir, attn_implementation="sdpa")
    with torch.no_grad():
        assert torch.allclose(eager(ids).logits, sdpa(ids).logits, atol=1e-5)


def test_bad_model_directories(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="missing config.json, model.safetensors, tokenizer files"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="pickle"):
        check_model_dir(tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_base_model("./does/not/exist")


def test_unreachable_hub_id_gives_clear_error():
    with pytest.raises(ModelError, match="Qwen/Qwen2.5-0.5B-Instruct: hub model not found in the local Hugging Face cache"):
        resolve_base_model("Qwen/Qwen2.5-0.5B-Instruct")
