"""FunctionalLoRA: batched, differentiable, hook-based LoRA on a frozen base model, checked against PEFT."""

import pytest
import torch
from peft import PeftModel

from llgbm_ext.delta.activations import last_token_states, mean_activations
from llgbm_ext.delta.functional import FunctionalLoRA
from llgbm_ext.delta.probes import encode_probes, get_probe_set
from llgbm_ext.errors import LayoutError, ModelError
from llgbm_ext.lora.adapters import save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model

LAYOUT = get_layout("tiny")
K = 3


def adapter(factors, k):
    """Factors of adapter k alone (no batch dim)."""
    return {proj: (a[k], b[k]) for proj, (a, b) in factors.items()}


def leaves(factors):
    """A copy of the factors as leaf tensors that collect gradients."""
    return {proj: (a.clone().requires_grad_(), b.clone().requires_grad_()) for proj, (a, b) in factors.items()}


def flat_grads(factors, k=None):
    """All gradients of the factors (of adapter k of a batch, if given) as one vector."""
    return torch.cat([(t.grad if k is None else t.grad[k]).flatten() for ab in factors.values() for t in ab])


def hooks_attached(lora):
    return sum(len(module._forward_hooks) for module in lora.targets.values())


@pytest.fixture
def factors():
    return random_factors(LAYOUT, K, std=0.1)  # B != 0, so every adapter changes the output


@pytest.fixture
def probes(tiny_model):
    return encode_probes(get_probe_set("generic"), tiny_model[1], "left")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_equals_peft_forward(tiny_model_dir, tmp_path, factors, attn):
    model, tokenizer = load_base_model(tiny_model_dir, attn_implementation=attn)
    for k in range(K):
        save_peft_adapter(state_dict_from_factors(adapter(factors, k), LAYOUT), tmp_path / f"a{k}", LAYOUT)
    peft_base, _ = load_base_model(tiny_model_dir, attn_implementation=attn)  # a separate fresh copy for PEFT
    peft_model = PeftModel.from_pretrained(peft_base, tmp_path / "a0", adapter_name="a0")
    for k in range(1, K):
        peft_model.load_adapter(tmp_path / f"a{k}", adapter_name=f"a{k}")

    batch = encode_probes(get_probe_set("domain:math"), tokenizer, "right")
    mask = batch.attention_mask.bool()  # compare every real token
    lora = FunctionalLoRA(model, LAYOUT)
    with lora.apply(factors), torch.no_grad():
        ours = lora.backbone(batch.input_ids.repeat(K, 1), attention_mask=batch.attention_mask.repeat(K, 1))
    ours = ours.last_hidden_state.view(K, len(batch), -1, LAYOUT.hidden_size)  # (K, P, T, H)
    for k in range(K):
        peft_model.set_adapter(f"a{k}")
        with torch.no_grad():
            theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        torch.testing.assert_close(ours[k][mask], theirs.hidden_states[-1][mask], rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="not a pristine base"):
        FunctionalLoRA(peft_model.base_model.model, LAYOUT)


def test_batched_equals_loop_values_and_gradients(tiny_model, probes, factors):
    lora = FunctionalLoRA(tiny_model[0], LAYOUT)
    batched = leaves(factors)
    v = mean_activations(lora, probes, batched)  # (K, H), one forward over K*P rows
    (v.square().sum() + v.sum()).backward()

    looped = [leaves(adapter(factors, k)) for k in range(K)]
    v_loop = torch.cat([mean_activations(lora, probes, looped[k]) for k in range(K)])  # K forwards
    (v_loop.square().sum() + v_loop.sum()).backward()

    assert not torch.allclose(v[0], v[1], atol=1e-3)  # the adapters really differ
    torch.testing.assert_close(v, v_loop, rtol=0, atol=1e-5)
    loop_grads = torch.stack([flat_grads(f) for f in looped])  # (K, numel of one adapter)
    batched_grads = torch.stack([flat_grads(batched, k) for k in range(K)])
    assert batched_grads.abs().max() > 0
    torch.testing.assert_close(batched_grads, loop_grads, rtol=1e-4, atol=1e-6)


def test_single_adapter_needs_no_batch_dim(tiny_model, probes, factors):
    lora = FunctionalLoRA(tiny_model[0], LAYOUT)
    with torch.no_grad():
        one = mean_activations(lora, probes, adapter(factors, 1))
        batched = mean_activations(lora, probes, factors)
    assert one.shape == (1, LAYOUT.hidden_size)
    torch.testing.assert_close(one[0], batched[1], rtol=0, atol=1e-5)


def test_zero_b_leaves_the_base_output_bit_identical(tiny_model, probes, factors):
    model = tiny_model[0]
    zero_b = {proj: (a, torch.zeros_like(b)) for proj, (a, b) in factors.items()}
    lora = FunctionalLoRA(model, LAYOUT)
    with torch.no_grad():
        base = last_token_states(lora.backbone, probes.input_ids, probes.attention_mask)
        with lora.apply(adapter(zero_b, 0)):
            adapted = last_token_states(lora.backbone, probes.input_ids, probes.attention_mask)
    assert torch.equal(base, adapted)


def test_base_model_untouched(tiny_model, probes, factors):
    model = tiny_model[0]
    before = {name: t.clone() for name, t in model.state_dict().items()}
    lora = FunctionalLoRA(model, LAYOUT)
    trained = leaves(factors)
    mean_activations(lora, probes, trained).sum().backward()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert not model.training and hooks_attached(lora) == 0


def test_hooks_removed_after_an_exception(tiny_model, probes, factors):
    lora = FunctionalLoRA(tiny_model[0], LAYOUT)
    with torch.no_grad():
        base = last_token_states(lora.backbone, probes.input_ids, probes.attention_mask)
    with pytest.raises(ZeroDivisionError):
        with lora.apply(factors):
            assert hooks_attached(lora) == LAYOUT.num_layers * len(LAYOUT.targets)
            1 / 0
    assert hooks_attached(lora) == 0
    with torch.no_grad():
        assert torch.equal(last_token_states(lora.backbone, probes.input_ids, probes.attention_mask), base)
    with lora.apply(factors):  # the model is free for the next block
        pass


def test_blocks_cannot_nest(tiny_model, factors):
    first, second = FunctionalLoRA(tiny_model[0], LAYOUT), FunctionalLoRA(tiny_model[0], LAYOUT)
    with first.apply(factors):
        with pytest.raises(RuntimeError, match="cannot nest"):
            with second.apply(factors):
                pass
    assert hooks_attached(first) == 0


def test_rows_must_split_among_adapters(tiny_model, probes, factors):
    lora = FunctionalLoRA(tiny_model[0], LAYOUT)
    with lora.apply(factors), pytest.raises(ValueError, match="cannot be split among 3 adapters"):
        lora.backbone(probes.input_ids[:4], attention_mask=probes.attention_mask[:4])


def test_factor_and_model_geometry_checked(tiny_model, factors):
    lora = FunctionalLoRA(tiny_model[0], LAYOUT)
    with pytest.raises(LayoutError, match="q_proj"):
        with lora.apply(random_factors(get_layout("tiny", rank=4), 2)):
            pass
    with pytest.raises(LayoutError, match="targets"):
        with lora.apply({p: ab for p, ab in factors.items() if p != "down_proj"}):
            pass
    with pytest.raises(LayoutError, match="layers"):
        FunctionalLoRA(tiny_model[0], get_layout("tiny", num_layers=3))
    with pytest.raises(LayoutError, match="expects"):
        FunctionalLoRA(tiny_model[0], get_layout("tiny", intermediate_size=256))


def _checkpointed_copy(tiny_model_dir, use_reentrant):
    model, _ = load_base_model(tiny_model_dir)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # transformers checkpoints only in training mode; the tiny model has no dropout
    return model


@pytest.mark.parametrize("backward_inside_block", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, tiny_model_dir, probes, factors, backward_inside_block):
    reference = leaves(factors)
    v_ref = mean_activations(FunctionalLoRA(tiny_model[0], LAYOUT), probes, reference)
    v_ref.square().sum().backward()

    model = _checkpointed_copy(tiny_model_dir, use_reentrant=False)
    calls = []
    for layer in model.model.layers:  # count the checkpointed layer calls, to be sure checkpointing is on
        original = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=original, **kw: calls.append(1) or _f(*a, **kw)
    lora = FunctionalLoRA(model, LAYOUT)
    checkpointed = leaves(factors)
    input_ids, mask = probes.input_ids.repeat(K, 1), probes.attention_mask.repeat(K, 1)
    with lora.apply(checkpointed):
        v = last_token_states(lora.backbone, input_ids, mask).view(K, len(probes), -1).mean(1)
        if backward_inside_block:
            v.square().sum().backward()
    if not backward_inside_block:  # the recomputation runs after the hooks were removed
        v.square().sum().backward()
    assert len(calls) == LAYOUT.num_layers and hooks_attached(lora) == 0
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(flat_grads(checkpointed), flat_grads(reference), rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_is_refused(tiny_model_dir, factors):
    lora = FunctionalLoRA(_checkpointed_copy(tiny_model_dir, use_reentrant=True), LAYOUT)
    with pytest.raises(ModelError, match="use_reentrant"):
        with lora.apply(factors):
            pass
    assert hooks_attached(lora) == 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bf16(tiny_model, tiny_model_dir, factors, attn):
    model, tokenizer = load_base_model(tiny_model_dir, dtype="bfloat16", attn_implementation=attn)
    probes = encode_probes(get_probe_set("generic"), tokenizer, "left")
    lora = FunctionalLoRA(model, LAYOUT)
    trained = leaves(factors)
    v = mean_activations(lora, probes, trained)
    v.sum().backward()
    assert v.dtype == torch.float32 and v.shape == (K, LAYOUT.hidden_size)
    grads = flat_grads(trained)
    assert bool(torch.isfinite(grads).all()) and grads.abs().max() > 0
    with torch.no_grad():
        v32 = mean_activations(FunctionalLoRA(tiny_model[0], LAYOUT), probes, factors)
    assert (v.detach() - v32).norm() / v32.norm() < 0.05


def test_llama_naming(tmp_path):
    """A Llama-architecture model (no q/k/v biases) works the same way, checked against PEFT."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from llgbm_ext.lora.layout import layout_from_config

    geometry = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(LlamaConfig(**geometry)).eval().requires_grad_(False)
    layout = layout_from_config(geometry, rank=4)
    factors = random_factors(layout, 2, std=0.1)
    save_peft_adapter(state_dict_from_factors(adapter(factors, 1), layout), tmp_path / "a1", layout)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a1")  # a separate copy
    input_ids = torch.randint(0, 256, (3, 9))
    lora = FunctionalLoRA(model, layout)
    with lora.apply(factors), torch.no_grad():
        ours = lora.backbone(input_ids.repeat(2, 1)).last_hidden_state[3:]  # rows of adapter 1
    with torch.no_grad():
        theirs = peft_model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
