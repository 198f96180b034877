"""Activations v(M): final-norm hidden state at the last real token, padding-independent, no LM head."""

import pytest
import torch

from llgbm_ext.delta.activations import base_activation, last_token_states, mean_activations
from llgbm_ext.delta.functional import FunctionalLoRA, get_backbone
from llgbm_ext.delta.probes import encode_probes, get_probe_set
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model

PROBES = get_probe_set("generic")


def unpadded_states(model, tokenizer, layer=-1):
    """Each probe run alone, without padding, through the full causal LM: (P, H) at its last token."""
    rows = []
    with torch.no_grad():
        for text in PROBES.texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            rows.append(model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, -1].float())
    return torch.stack(rows)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_does_not_change_the_states(tiny_model_dir, attn, padding_side):
    model, tokenizer = load_base_model(tiny_model_dir, attn_implementation=attn)
    batch = encode_probes(PROBES, tokenizer, padding_side)
    assert not bool(batch.attention_mask.all())  # the batch really is padded
    with torch.no_grad():
        states = last_token_states(get_backbone(model), batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(states, unpadded_states(model, tokenizer), rtol=0, atol=1e-5)


def test_layer_indices(tiny_model):
    model, tokenizer = tiny_model
    backbone = get_backbone(model)
    batch = encode_probes(PROBES, tokenizer, "right")
    n_layers = len(backbone.layers)
    last = batch.attention_mask.sum(1) - 1  # right padding: last real token

    def states(layer):
        with torch.no_grad():
            return last_token_states(backbone, batch.input_ids, batch.attention_mask, layer)

    captured = {}
    handle = backbone.layers[-1].register_forward_hook(lambda m, i, o: captured.update(out=o[0] if isinstance(o, tuple) else o))
    try:
        final = states(-1)
    finally:
        handle.remove()
    rows = torch.arange(len(batch))
    with torch.no_grad():
        normed = backbone.norm(captured["out"])[rows, last].float()  # final norm of the last layer's output
        embedded = backbone.embed_tokens(batch.input_ids)[rows, last].float()
    torch.testing.assert_close(final, normed, rtol=0, atol=1e-6)
    assert torch.equal(states(n_layers), final)
    torch.testing.assert_close(states(0), embedded, rtol=0, atol=0)
    torch.testing.assert_close(states(-2), unpadded_states(model, tokenizer, layer=n_layers - 1), rtol=0, atol=1e-5)
    assert (states(-2) - final).abs().max() > 1e-2  # an inner layer is not normed
    for bad in (n_layers + 1, -(n_layers + 2), 1.0):
        with pytest.raises(ValueError, match="layer must be an integer"):
            states(bad)


def test_the_lm_head_is_never_called(tiny_model_dir):
    model, tokenizer = load_base_model(tiny_model_dir)
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    batch = encode_probes(PROBES, tokenizer)
    base_activation(model, batch)
    lora = FunctionalLoRA(model, get_layout("tiny"))
    mean_activations(lora, batch, None)
    assert calls == []


def test_base_activation_is_the_fp32_mean_over_probes(tiny_model_dir):
    model, tokenizer = load_base_model(tiny_model_dir, dtype="bfloat16")
    batch = encode_probes(PROBES, tokenizer)
    v = base_activation(model, batch)
    assert v.dtype == torch.float32 and v.shape == (model.config.hidden_size,)
    with torch.no_grad():
        states = last_token_states(get_backbone(model), batch.input_ids, batch.attention_mask)
    assert states.dtype == torch.float32
    torch.testing.assert_close(v, states.sum(0) / len(batch), rtol=1e-6, atol=1e-6)
    lora = FunctionalLoRA(model, get_layout("tiny"))
    with torch.no_grad():
        assert torch.equal(mean_activations(lora, batch, None)[0], v)  # one code path for base and adapters
