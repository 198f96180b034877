"""DnD token format: exactness (against a per-chunk reference and, when present, DnD's own code),
round trips for every named layout, gradients through detokenize, bf16 behaviour."""

import sys
from collections import OrderedDict

import pytest
import torch

from conftest import REPO_ROOT, requires_dnd
from llgbm_ext.lora.factors import factors_from_state_dict, random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import NAMED_LAYOUTS, LoraLayout, get_layout, peft_key
from llgbm_ext.lora.tokens import detokenize, lora_to_tokens, tokenize, tokens_to_lora


def reference_tokenize(state_dict, layout):
    """Plain per-chunk loop written from DnD's description (contract §1.3), for comparison."""
    height, width = layout.token_size
    tokens = []
    for layer, proj, factor, _, count in layout.token_spans():
        weight = state_dict[peft_key(layer, proj, factor)]
        weight = weight if factor == "A" else weight.T
        for chunk in torch.chunk(weight, count, dim=1):
            mean, std = chunk.mean(), chunk.std()
            token = torch.full((height, width), float("nan"))
            token[: chunk.shape[0], : chunk.shape[1]] = (chunk - mean) / std
            m, s = mean * 8, torch.log(std * 0.9 + 0.1) + 1.6
            token[-2:, 0::2], token[-2:, 1::2] = m, s
            token[:, -2], token[:, -1] = m, s
            tokens.append(token)
    return torch.stack(tokens)


def random_state_dict(layout, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    sd = state_dict_from_factors(random_factors(layout, generator=g, std=std), layout)
    # give chunks different means, as trained adapters have
    return {k: v + 0.01 * torch.randn((), generator=g) for k, v in sd.items()}


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b"])
def test_tokenize_matches_per_chunk_reference(name):
    layout = get_layout(name)
    sd = random_state_dict(layout)
    assert torch.allclose(lora_to_tokens(sd, layout), reference_tokenize(sd, layout), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(NAMED_LAYOUTS))
def test_round_trip_every_named_layout(name):
    layout = NAMED_LAYOUTS[name]
    sd = random_state_dict(layout, seed=1)
    tokens = lora_to_tokens(sd, layout)
    assert tokens.shape == (layout.num_tokens, *layout.token_size) and tokens.dtype == torch.float32
    assert not torch.isnan(tokens).any()  # DnD's sizes are (r+2, chunk+2): every cell is used
    back = tokens_to_lora(tokens, layout)
    assert back.keys() == sd.keys()
    assert max((back[k] - sd[k]).abs().max().item() for k in sd) <= 1e-6


def test_larger_token_size_pads_with_nan_and_round_trips():
    layout = get_layout("tiny", token_size=(12, 70))
    sd = random_state_dict(layout)
    tokens = lora_to_tokens(sd, layout)
    assert torch.isnan(tokens[:, 8:10, :66]).all() and torch.isnan(tokens[:, :8, 64:68]).all()
    assert not torch.isnan(tokens[:, -2:, :]).any() and not torch.isnan(tokens[:, :, -2:]).any()
    back = tokens_to_lora(tokens, layout)
    assert max((back[k] - sd[k]).abs().max().item() for k in sd) <= 1e-6


def test_batched_tokenize_and_detokenize_equal_per_adapter():
    layout = get_layout("tiny")
    factors = random_factors(layout, 3)
    tokens = tokenize(factors, layout)
    assert tokens.shape == (3, layout.num_tokens, *layout.token_size)
    for i in range(3):
        single = {p: (a[i], b[i]) for p, (a, b) in factors.items()}
        assert torch.equal(tokens[i], tokenize(single, layout))
    batched = detokenize(tokens + 0.1, layout)
    for i in range(3):
        single = detokenize(tokens[i] + 0.1, layout)
        for p in layout.targets:
            assert torch.equal(batched[p][0][i], single[p][0]) and torch.equal(batched[p][1][i], single[p][1])


def test_detokenize_averages_scale_code_like_dnd():
    """Perturb only the scale rows/columns: the decoded mean/std must follow DnD's averaging rule."""
    layout = LoraLayout("one", 1, 2, 2, 2, 2, rank=2, alpha=2, chunk=2, token_size=(4, 4), targets=("q_proj",))
    tokens = torch.zeros(layout.num_tokens, 4, 4)
    tokens[0, :2, :2] = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    tokens[0, 2, 0::2], tokens[0, 2, 1::2] = 0.8, 1.6  # row parity 0: m' = 0.8, s' = 1.6
    tokens[0, 3, 0::2], tokens[0, 3, 1::2] = 1.6, 1.6 + torch.log(torch.tensor(1.9)).item()  # parity 1
    tokens[0, 0::2, 2], tokens[0, 0::2, 3] = 0.8, 1.6  # columns, rows 0 and 2 (parity 0)
    tokens[0, 1::2, 2], tokens[0, 1::2, 3] = 1.6, 1.6 + torch.log(torch.tensor(1.9)).item()
    # parity 0 decodes to mean 0.1, std 1.0; parity 1 to mean 0.2, std (1.9 - 0.1) / 0.9 = 2.0
    a, _ = detokenize(tokens, layout)["q_proj"]
    expected = torch.tensor([[1.0, -1.0], [0.5, 0.0]]) * 1.5 + 0.15
    assert torch.allclose(a[0], expected, atol=1e-6)


def test_detokenize_is_differentiable():
    layout = LoraLayout("small", 1, 4, 8, 2, 4, rank=2, alpha=4, chunk=2, token_size=(4, 4))
    tokens = tokenize(random_factors(layout), layout).double().requires_grad_(True)

    def flat(t):
        return torch.cat([x.flatten() for pair in detokenize(t, layout).values() for x in pair])

    assert torch.autograd.gradcheck(flat, (tokens,), eps=1e-6, atol=1e-5)
    flat(tokens).sum().backward()
    grad = tokens.grad
    assert grad[:, :2, :2].abs().sum() > 0  # data block
    assert grad[:, 2:, :].abs().sum() > 0 and grad[:, :, 2:].abs().sum() > 0  # scale code


def test_zero_variance_chunk_stays_finite():
    """PEFT initialises lora_B to zero; DnD gives NaN tokens (0/0) there, we give zeros that decode exactly."""
    layout = get_layout("tiny")
    sd = random_state_dict(layout)
    sd[peft_key(0, "q_proj", "B")] = torch.zeros_like(sd[peft_key(0, "q_proj", "B")])
    tokens = lora_to_tokens(sd, layout)
    assert torch.isfinite(tokens).all()
    back = tokens_to_lora(tokens, layout)
    assert back[peft_key(0, "q_proj", "B")].abs().max() < 1e-7


def test_bfloat16_behaviour():
    """bf16 adapters: statistics are computed in float32. bf16 tokens: decoded in float32 arithmetic,
    the error is what bf16 token values carry (~1% of the largest weight), not the ~8% of bf16 arithmetic."""
    layout = get_layout("tiny")
    sd = {k: v.bfloat16() for k, v in random_state_dict(layout).items()}
    tokens = lora_to_tokens(sd, layout)
    assert tokens.dtype == torch.float32
    assert torch.equal(tokens, lora_to_tokens({k: v.float() for k, v in sd.items()}, layout))
    exact = tokens_to_lora(tokens, layout)  # float32 decode of bf16 weights: exact up to fp32 rounding
    assert max((exact[k] - sd[k].float()).abs().max().item() for k in sd) <= 1e-6
    low = tokens_to_lora(tokens.bfloat16(), layout)  # bf16 tokens, e.g. a generator under bf16 autocast
    assert all(v.dtype == torch.float32 for v in low.values())
    rel = max(((low[k] - sd[k].float()).abs().max() / sd[k].float().abs().max()).item() for k in sd)
    assert 1e-4 < rel < 0.03


def test_detokenize_rejects_wrong_shape():
    layout = get_layout("tiny")
    with pytest.raises(ValueError, match="do not match layout 'tiny'"):
        detokenize(torch.zeros(10, 10, 66), layout)


def _dnd_tokenizers():
    sys.path.insert(0, str(REPO_ROOT / "dnd_repo"))
    from workspace.dnd.dataset.dataset import CheckpointDataset_PaddedToSame
    from workspace.dnd.tokenizer import Qwen257BLoRA_Tokenizer2D, Qwen2505LoRA_Tokenizer2D, Qwen2515LoRA_Tokenizer2D

    factories = {"qwen2.5-0.5b": Qwen2505LoRA_Tokenizer2D, "qwen2.5-1.5b": Qwen2515LoRA_Tokenizer2D,
                 "qwen2.5-7b": Qwen257BLoRA_Tokenizer2D}
    return factories, CheckpointDataset_PaddedToSame


@requires_dnd
@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_equal_to_dnd_tokenizer(name):
    """Against DnD's own Qwen*LoRA_Tokenizer2D, fed exactly as its dataset does (prefix stripped, sort_key order)."""
    factories, dataset = _dnd_tokenizers()
    layout = get_layout(name)
    sd = random_state_dict(layout, seed=2)
    dnd = factories[name](token_size=layout.token_size)
    ordered = OrderedDict(sorted(dataset.post_process(dict(sorted(sd.items()))).items(), key=dataset.sort_key))
    dnd_tokens, _ = dnd.tokenize(ordered)
    ours = lora_to_tokens(sd, layout)
    assert (dnd_tokens - ours).abs().max().item() <= 4e-6

    noisy = dnd_tokens + 0.05 * torch.randn_like(dnd_tokens)  # decoding must follow DnD on arbitrary tokens too
    structure = OrderedDict(sorted(sd.items(), key=lambda kv: dataset.sort_key((kv[0].replace("base_model.model.", ""),))))
    dnd_sd = dnd.detokenize(structure, noisy.clone())
    ours_sd = tokens_to_lora(noisy, layout)
    assert dnd_sd.keys() == ours_sd.keys()
    assert max((dnd_sd[k] - ours_sd[k]).abs().max().item() for k in ours_sd) <= 4e-6


def test_factors_state_dict_round_trip():
    layout = get_layout("tiny")
    sd = random_state_dict(layout)
    assert all(torch.equal(v, sd[k]) for k, v in state_dict_from_factors(factors_from_state_dict(sd, layout), layout).items())
