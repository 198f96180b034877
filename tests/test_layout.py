"""LoRA layouts: DnD's named geometries, derivation from config.json, and the token-order rules."""

import json

import pytest
import torch

from llgbm_ext.errors import LayoutError
from llgbm_ext.lora.layout import NAMED_LAYOUTS, LoraLayout, get_layout, layout_from_config, peft_key
from llgbm_ext.lora.tokens import lora_to_tokens, tokenize, tokens_to_lora

QWEN_CONFIGS = {  # the fields of the real Qwen2.5 config.json files that a layout reads
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, model_type="qwen2"),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, model_type="qwen2"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, model_type="qwen2"),
}


@pytest.mark.parametrize(
    "name, n_tokens, token_size, rank",
    [("qwen2.5-0.5b", 4296, (10, 130), 8), ("qwen2.5-1.5b", 4508, (18, 258), 16), ("qwen2.5-7b", 4928, (18, 514), 16)],
)
def test_named_layouts_match_dnd_tokenizers(name, n_tokens, token_size, rank):
    layout = get_layout(name)
    assert (layout.num_tokens, layout.token_size, layout.rank, layout.alpha) == (n_tokens, token_size, rank, 2 * rank)
    assert len(layout.keys()) == 14 * layout.num_layers


def test_per_layer_token_counts_of_05b():
    # DnD's Qwen2505 selector: q,o 7+7; k,v 7+1; up,gate 7+38; down 38+7
    layout = get_layout("qwen2.5-0.5b")
    counts = {p: layout.tokens_per_module(p) for p in layout.targets}
    assert counts == {"q_proj": (7, 7), "k_proj": (7, 1), "v_proj": (7, 1), "o_proj": (7, 7),
                      "up_proj": (7, 38), "gate_proj": (7, 38), "down_proj": (38, 7)}
    assert layout.tokens_per_layer == 179


@pytest.mark.parametrize("name", sorted(QWEN_CONFIGS))
def test_derived_from_config_equals_named(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_CONFIGS[name]))
    named = get_layout(name)
    derived = layout_from_config(tmp_path, rank=named.rank, name=name)
    assert derived == named
    assert get_layout(tmp_path, rank=named.rank).num_tokens == named.num_tokens


def test_llama_config_and_tiny_model_config(tiny_model_dir):
    llama = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, model_type="llama")  # SmolLM2-135M
    layout = layout_from_config(llama)
    assert (layout.kv_size, layout.chunk, layout.token_size) == (192, 192, (10, 194))
    assert layout_from_config(tiny_model_dir, name="tiny") == get_layout("tiny")


def test_targets_are_put_in_canonical_order_and_validated():
    layout = get_layout("tiny", targets=("v_proj", "q_proj"))
    assert layout.targets == ("q_proj", "v_proj")
    with pytest.raises(LayoutError, match="targets"):
        get_layout("tiny", targets=("q_proj", "lm_head"))


def test_bad_layouts_are_rejected():
    with pytest.raises(LayoutError, match="unknown layout 'qwen9'"):
        get_layout("qwen9")
    with pytest.raises(LayoutError, match="does not divide"):
        get_layout("tiny", chunk=48)
    with pytest.raises(LayoutError, match="smaller than"):
        get_layout("tiny", token_size=(8, 66))
    with pytest.raises(LayoutError, match="even"):
        get_layout("tiny", token_size=(11, 66))
    with pytest.raises(LayoutError, match="missing key 'num_attention_heads'"):
        layout_from_config({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1})


def test_token_order_on_a_hand_checked_example():
    """One layer, hidden 4, intermediate 8, kv 2, rank 2, chunk 2: 34 tokens of 4x4.

    Expected order, worked out by hand from DnD's rules: per module the A chunks (columns 0:2, 2:4 of A),
    then the chunks of Bᵀ; modules q, k, v, o, up, gate, down. Token counts: q 2+2, k 2+1, v 2+1, o 2+2,
    up 2+4, gate 2+4, down 4+2, i.e. 32.
    """
    layout = LoraLayout("hand", 1, 4, 8, 2, 4, rank=2, alpha=4, chunk=2, token_size=(4, 4))
    assert layout.num_tokens == 32
    shapes = layout.expected_shapes()
    # Give every module a distinct constant offset so each token can be traced back to its source.
    base = {p: 10.0 * (k + 1) for k, p in enumerate(layout.targets)}
    factors = {}
    for p in layout.targets:
        (ra, ia), (ob, rb) = shapes[peft_key(0, p, "A")], shapes[peft_key(0, p, "B")]
        a = base[p] + torch.arange(ra * ia, dtype=torch.float32).reshape(1, ra, ia)
        b = -base[p] - torch.arange(ob * rb, dtype=torch.float32).reshape(1, ob, rb)
        factors[p] = (a, b)
    tokens = tokenize(factors, layout)
    expected_sources = (
        [("q_proj", "A", 0), ("q_proj", "A", 1), ("q_proj", "B", 0), ("q_proj", "B", 1)]
        + [("k_proj", "A", 0), ("k_proj", "A", 1), ("k_proj", "B", 0)]
        + [("v_proj", "A", 0), ("v_proj", "A", 1), ("v_proj", "B", 0)]
        + [("o_proj", "A", 0), ("o_proj", "A", 1), ("o_proj", "B", 0), ("o_proj", "B", 1)]
        + [("up_proj", "A", j) for j in range(2)] + [("up_proj", "B", j) for j in range(4)]
        + [("gate_proj", "A", j) for j in range(2)] + [("gate_proj", "B", j) for j in range(4)]
        + [("down_proj", "A", j) for j in range(4)] + [("down_proj", "B", j) for j in range(2)]
    )
    assert len(expected_sources) == 32
    for t, (proj, factor, j) in enumerate(expected_sources):
        a, b = factors[proj]
        src = a[0] if factor == "A" else b[0].T  # (r, width)
        block = src[:, 2 * j : 2 * j + 2]
        mean, std = block.mean(), block.std()  # unbiased std, as DnD
        assert torch.allclose(tokens[t, :2, :2], (block - mean) / std, atol=1e-6), (t, proj, factor, j)
        m_code, s_code = 8 * mean, torch.log(0.9 * std + 0.1) + 1.6
        # last two rows: m', s', m', s'; last two columns: [m', s'] on every row
        assert torch.allclose(tokens[t, 2:, 0::2], m_code.expand(2, 2)) and torch.allclose(tokens[t, 2:, 1::2], s_code.expand(2, 2))
        assert torch.allclose(tokens[t, :, 2], m_code.expand(4)) and torch.allclose(tokens[t, :, 3], s_code.expand(4))


def test_layout_dict_round_trip():
    for layout in NAMED_LAYOUTS.values():
        assert LoraLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


# DnD's token order for a 2-layer Qwen2-shaped model (hidden 8, intermediate 16, 2 heads and 1 KV head of
# width 4, rank 2, chunk 4), written out by hand from the contract (§1.3: layer ascending; q, k, v, o, up,
# gate, down; in each module the chunks of lora_A (r, in), then those of lora_Bᵀ (r, out)): (key, chunks).
TWO_LAYER_QWEN2 = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "model_type": "qwen2"}
HAND_ORDER = [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", 2),
    ("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight", 1),
    ("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", 1),
    ("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight", 2),
    ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", 4),
    ("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight", 4),
    ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", 4),
    ("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", 2),
    ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 2),
    ("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight", 1),
    ("base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", 1),
    ("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight", 2),
    ("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight", 4),
    ("base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight", 2),
    ("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight", 4),
    ("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight", 4),
    ("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", 2),
]


def hand_chunk(state_dict: dict, key: str, j: int) -> torch.Tensor:
    """Chunk j (r × 4) of a factor: columns 4j:4j+4 of lora_A, or of lora_Bᵀ."""
    weight = state_dict[key] if ".lora_A." in key else state_dict[key].T
    return weight[:, 4 * j : 4 * j + 4]


def test_token_order_across_layers_matches_a_hand_written_enumeration():
    """Tokenize and detokenize follow the hand-written order above token by token (not ``token_spans()``)."""
    layout = layout_from_config(TWO_LAYER_QWEN2, rank=2, name="two-layer")
    assert (layout.chunk, layout.token_size, layout.num_tokens) == (4, (4, 6), 64)
    order = [(key, j) for key, chunks in HAND_ORDER for j in range(chunks)]
    assert len(order) == 64
    shapes = layout.expected_shapes()
    assert sorted(shapes) == sorted(key for key, _ in HAND_ORDER)
    g = torch.Generator().manual_seed(0)
    state_dict = {key: torch.randn(shapes[key], generator=g) for key in shapes}
    for t, (key, j) in enumerate(order):  # every chunk its own mean: a token shows where it came from
        hand_chunk(state_dict, key, j).add_(t + 1.0)

    tokens = lora_to_tokens(state_dict, layout)
    for t, (key, j) in enumerate(order):
        chunk = hand_chunk(state_dict, key, j)
        assert torch.allclose(tokens[t, :2, :4], (chunk - chunk.mean()) / chunk.std(), atol=1e-4), (t, key, j)
        assert torch.allclose(tokens[t, :, 4], 8 * chunk.mean().expand(4)), (t, key, j)  # the mean code

    # decoding: token t carries data 0 and the scale code of mean t + 1, std 1; its chunk must come back as t + 1
    marked = torch.zeros(64, 4, 6)
    marked[:, -2:, 0::2] = marked[:, :, -2:-1] = 8.0 * torch.arange(1, 65.0)[:, None, None]
    marked[:, -2:, 1::2] = marked[:, :, -1:] = torch.log(torch.tensor(0.9 * 1.0 + 0.1)) + 1.6
    decoded = tokens_to_lora(marked, layout)
    for t, (key, j) in enumerate(order):
        assert torch.allclose(hand_chunk(decoded, key, j), torch.full((2, 4), t + 1.0)), (t, key, j)


def test_layers_are_in_numeric_order_beyond_ten():
    """Layer 10 follows layer 9 (numeric order), not layer 1 (the string order of sorted keys, contract §6.23)."""
    layout = layout_from_config({**TWO_LAYER_QWEN2, "num_hidden_layers": 12}, rank=2, chunk=4, targets=("q_proj",))
    hand_layers = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # each layer: 2 A-chunks and 2 Bᵀ-chunks of q_proj
    state_dict = {key: torch.full(shape, float(key.split(".")[4]))
                  for key, shape in layout.expected_shapes().items()}
    state_dict = {k: v + 0.1 * torch.randn(v.shape) for k, v in state_dict.items()}  # a non-zero std
    means = lora_to_tokens(state_dict, layout)[:, 0, -2] / 8  # the mean code of every token
    assert torch.allclose(means.view(12, 4), torch.tensor(hand_layers, dtype=torch.float32)[:, None].expand(12, 4), atol=0.3)
