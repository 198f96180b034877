"""Generators: output shapes, gradients through detokenize, DnD's 0.5B size counted without
allocation, initialisation that decodes to small finite adapters, equality with DnD's HyperConv."""

import math
import sys
from dataclasses import replace

import pytest
import torch

from conftest import REPO_ROOT, requires_dnd
from llgbm_ext.config import from_dict, load_config, to_dict
from llgbm_ext.generator import (
    NAMED_GENERATORS,
    GeneratorConfig,
    GeneratorError,
    build_generator,
    count_parameters,
    get_generator_config,
    load_dnd_state_dict,
)
from llgbm_ext.generator.hyperconv import HyperConvDecoder
from llgbm_ext.lora.factors import random_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.lora.tokens import detokenize, tokenize

TINY = get_layout("tiny")
KINDS = ["tiny", "tiny-simple"]


def condition_for(cfg, batch=4, seed=0):
    return torch.randn(batch, *cfg.condition_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", KINDS)
def test_output_shape_and_dtype(name):
    cfg = get_generator_config(name)
    tokens = build_generator(cfg, TINY)(condition_for(cfg))
    assert tokens.shape == (4, TINY.num_tokens, *TINY.token_size) == (4, 152, 10, 66)
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", KINDS)
def test_gradients_reach_every_parameter_through_detokenize(name):
    cfg = get_generator_config(name)
    generator = build_generator(cfg, TINY)
    factors = generator.lora_factors(condition_for(cfg, batch=2))
    g = torch.Generator().manual_seed(1)
    loss = sum((a * torch.randn(a.shape, generator=g)).sum() + (b * torch.randn(b.shape, generator=g)).sum()
               for a, b in factors.values())
    loss.backward()
    for pname, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname


def hyperconv_parameters(features, k):
    """Closed-form count from DnD's description (contract §1.2), per layer i -> o."""
    total = 0
    for (l_in, h_in, w_in), (l_out, h_out, w_out) in zip(features[:-1], features[1:]):
        total += 2 * h_in * w_in  # LayerNorm over (H, W)
        total += 2 * w_in * w_out * k * k + 2 * h_in * h_out * k * k  # conv1w, conv2w, conv1h, conv2h
        total += h_out * w_out  # bias
        total += l_in * l_out * k * k + l_out  # linear2
    return total


def test_dnd_05b_size_counted_without_allocating():
    cfg, layout = NAMED_GENERATORS["dnd-qwen2.5-0.5b"], get_layout("qwen2.5-0.5b")
    features = cfg.hyperconv_features(layout)
    assert features[0] == (128, 384, 384) and features[-1] == (4296, 10, 130) and len(features) == 9
    n = count_parameters(cfg, layout)  # meta device: 4.45 GB at fp32 would not be allocated
    assert n == hyperconv_parameters(features, 9)
    assert abs(n - 1.113e9) / 1.113e9 < 0.005
    assert abs(2048 * 4296 * 81 - 713e6) / 713e6 < 0.005  # the last linear2 dominates, as the contract says


@pytest.mark.parametrize("name", KINDS)
def test_tiny_sizes_match_their_formula(name):
    cfg = get_generator_config(name)
    n = count_parameters(cfg, TINY)
    assert n == sum(p.numel() for p in build_generator(cfg, TINY).parameters())
    if cfg.kind == "hyperconv":
        assert n == hyperconv_parameters(cfg.hyperconv_features(TINY), cfg.kernel_size)
    else:
        c, d, hw = cfg.embed_dim, cfg.hidden_size, math.prod(TINY.token_size)
        assert n == 2 * c + c * d + d + d * d + d + TINY.num_tokens * d + 2 * d + d * hw + hw


def stds(factors):
    return {proj: (a.std().item(), b.std().item()) for proj, (a, b) in factors.items()}


@pytest.mark.parametrize("name", KINDS)
def test_initial_adapters_are_small_finite_and_condition_dependent(name):
    cfg = get_generator_config(name)
    generator = build_generator(cfg, TINY)
    cond = condition_for(cfg, batch=2)
    with torch.no_grad():
        tokens = generator(cond)
        factors = detokenize(tokens, TINY)
    for proj, (a, b) in factors.items():
        fan_in = TINY.proj_shape(proj)[0]
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert a.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)  # PEFT's kaiming-uniform A
        assert b.std().item() < 3 * cfg.prior_b_std
        delta_w = TINY.scaling * b @ a  # (2, L, out, in)
        assert delta_w.abs().max().item() < 5e-3
    change = (tokens[0] - tokens[1]).abs().max().item()
    assert 0 < change < 0.1  # conditions differ a little: the body writes a small residual
    # DnD's plain initialisation (no prior, full-scale last layer) decodes to far larger weights
    plain = build_generator(replace(cfg, prior="none", output_scale=1.0), TINY)
    with torch.no_grad():
        plain_b = detokenize(plain(cond), TINY)["q_proj"][1]
    assert plain_b.std().item() > 5 * factors["q_proj"][1].std().item()


def test_build_is_seeded_and_leaves_the_global_rng_alone():
    cfg = get_generator_config("tiny")
    state = torch.random.get_rng_state()
    a, b = build_generator(cfg, TINY), build_generator(cfg, TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    c = build_generator(get_generator_config("tiny", seed=1), TINY)
    assert not torch.equal(c.prior, a.prior)


def test_set_prior_starts_at_a_given_adapter():
    cfg = get_generator_config("tiny-simple", output_scale=1e-6)
    generator = build_generator(cfg, TINY)
    teacher = random_factors(TINY, generator=torch.Generator().manual_seed(3), std=0.02)
    generator.set_prior(tokenize(teacher, TINY))
    with torch.no_grad():
        out = generator.lora_factors(condition_for(cfg, batch=1))
    for proj, (a, b) in teacher.items():
        torch.testing.assert_close(out[proj][0][0], a, atol=1e-4, rtol=0)
        torch.testing.assert_close(out[proj][1][0], b, atol=1e-4, rtol=0)
    with pytest.raises(GeneratorError, match="prior tokens"):
        generator.set_prior(torch.zeros(3, 10, 66))


def test_config_validation_and_round_trip():
    cfg = get_generator_config("dnd-qwen2.5-0.5b")
    assert from_dict(GeneratorConfig, to_dict(cfg)) == cfg
    assert load_config(GeneratorConfig, None, ["kind=simple", "features=[[4,8,16]]"]).features == ((4, 8, 16),)
    assert cfg.condition_shape == (128, 384, 384) and cfg.condition_level == "tokens"
    assert get_generator_config("tiny-simple").condition_level == "pooled"
    with pytest.raises(GeneratorError, match="kind"):
        GeneratorConfig(kind="mlp")
    with pytest.raises(GeneratorError, match="odd"):
        GeneratorConfig(kernel_size=4)
    with pytest.raises(GeneratorError, match="unknown generator config"):
        get_generator_config("huge")
    tiny = get_generator_config("tiny")
    full = replace(tiny, features=tuple(tiny.hyperconv_features(TINY)))  # DnD's full list
    with pytest.raises(GeneratorError, match="hidden triples"):
        build_generator(full, TINY)
    with pytest.raises(ValueError, match="features\\[0\\]"):
        build_generator(get_generator_config("tiny"), TINY)(torch.zeros(1, 8, 32, 384))


def _dnd_hyperconv():
    sys.path.insert(0, str(REPO_ROOT / "dnd_repo"))
    from workspace.dnd.module.hyperconv import HyperConvDecoder as DnDHyperConvDecoder

    return DnDHyperConvDecoder


@requires_dnd
def test_hyperconv_equals_dnd_and_loads_its_weights():
    cfg = get_generator_config("tiny", features=((16, 8, 32), (16, 8, 32)))  # includes a residual layer
    features = cfg.hyperconv_features(TINY)
    dnd = _dnd_hyperconv()(features, condition_dim=features[0], kernel_size=cfg.kernel_size)
    ours = HyperConvDecoder(features, cfg.kernel_size)
    ours.load_state_dict(dnd.state_dict())  # same names and shapes
    x = condition_for(cfg, batch=2)
    torch.testing.assert_close(ours(x), dnd(x), atol=1e-5, rtol=1e-5)

    generator = build_generator(cfg, TINY)
    checkpoint = {f"model.{k}": v for k, v in dnd.state_dict().items()} | {"criterion_weight": torch.ones(152)}
    load_dnd_state_dict(generator, checkpoint)
    torch.testing.assert_close(generator(x), dnd(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(GeneratorError, match="does not match"):
        load_dnd_state_dict(build_generator(get_generator_config("tiny"), TINY), checkpoint)
