"""Gradient checkpointing of the frozen base in eval mode: same gradients, recomputation really happens."""

import torch

from llgbm_ext.delta.deltas import DeltaComputer
from llgbm_ext.delta.functional import enable_gradient_checkpointing
from llgbm_ext.delta.probes import get_probe_set
from llgbm_ext.lora.factors import random_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model


def _grads(model, tokenizer, factors):
    layout = get_layout("tiny")
    leaves = {p: (a.clone().requires_grad_(), b.clone().requires_grad_()) for p, (a, b) in factors.items()}
    delta = DeltaComputer(model, tokenizer, layout, get_probe_set("generic")).deltas(leaves)
    delta.square().sum().backward()
    return delta.detach(), [t.grad for pair in leaves.values() for t in pair]


def test_checkpointing_in_eval_mode_matches(tiny_model_dir):
    factors = random_factors(get_layout("tiny"), 2, std=0.05)
    plain, tokenizer = load_base_model(tiny_model_dir)
    ref_delta, ref_grads = _grads(plain, tokenizer, factors)

    checkpointed, _ = load_base_model(tiny_model_dir)
    enable_gradient_checkpointing(checkpointed)
    calls = []
    for layer in checkpointed.model.layers:
        original = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    delta, grads = _grads(checkpointed, tokenizer, factors)
    assert calls, "no layer was checkpointed"
    assert not any(m.training for name, m in checkpointed.named_modules() if name.endswith(("self_attn", "mlp")))
    assert torch.allclose(delta, ref_delta, atol=1e-6)
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, ref_grads))
