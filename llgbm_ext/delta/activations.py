"""Activations v(M): the hidden state at each probe's last real token, averaged over the probes.

Definition (Delta Activations, arXiv 2509.04442): the final layer's output AFTER the final norm, at
the last token of each probe, in fp32, averaged over the probe set. Only the backbone runs (no LM
head, no logits). Probes are batched with padding; the last *real* token is found from the
attention mask and position ids are ``cumsum(mask) - 1``, so left- and right-padded batches both
equal running every probe alone without padding.

``layer`` selects an entry of transformers' ``hidden_states`` tuple, which has L + 1 entries for
L decoder layers:
  * ``-1`` (default) or ``L``: the output of the final norm, the paper's definition;
  * ``0``: the token embeddings;
  * ``i`` in 1..L-1: the residual stream after decoder layer i (1-based), before any norm;
  * other negative values count from the end, so ``-2`` is the stream after layer L-1.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..lora.factors import LoraFactors
from .functional import FunctionalLoRA, get_backbone, num_adapters
from .probes import ProbeBatch


def check_layer(backbone: nn.Module, layer: int) -> None:
    """Reject a layer index outside the L + 1 entries of ``hidden_states``."""
    count = len(backbone.layers) + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
        raise ValueError(f"layer must be an integer in [{-count}, {count - 1}] (-1 = final norm output), got {layer!r}")


def last_token_states(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int = -1) -> Tensor:
    """Hidden state of ``layer`` at each row's last real token, as fp32 of shape (N, H).

    Args:
        backbone: the decoder stack (``get_backbone(model)``), called without the LM head.
        input_ids: (N, T) token ids, left- or right-padded.
        attention_mask: (N, T), 1 for real tokens; every row needs at least one.
        layer: index into ``hidden_states`` (see the module docstring); -1 is the final norm output.
    """
    check_layer(backbone, layer)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (N, T): 0 at each row's first real token
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=layer != -1,
    )
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]  # (N, T, H)
    steps = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    last = (attention_mask * steps).argmax(-1)  # (N,): position of each row's last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # (N, H)


def adapter_probe_states(
    lora: FunctionalLoRA, input_ids: Tensor, attention_mask: Tensor, factors: LoraFactors, layer: int = -1
) -> Tensor:
    """v_p(base + adapter k) for each of the K adapters of ``factors`` and each of its P probe rows:
    (K, P, H) fp32. Rows k·P … (k+1)·P − 1 of the (K·P, T) batch belong to adapter k (each adapter may
    have its own probes). One forward for all rows; differentiable in the factors."""
    k = num_adapters(factors)
    with lora.apply(factors):
        states = last_token_states(lora.backbone, input_ids, attention_mask, layer)  # (K*P, H) fp32
    return states.view(k, states.shape[0] // k, -1)


def probe_mean(states: Tensor, k: int) -> Tensor:
    """(K·P, H) per-(adapter, probe) states -> (K, H) means over each adapter's P probes (fp32)."""
    return states.view(k, states.shape[0] // k, -1).mean(dim=1)


def mean_activations(
    lora: FunctionalLoRA, probes: ProbeBatch, factors: LoraFactors | None = None, layer: int = -1
) -> Tensor:
    """v(base + adapter k) for the K adapters of ``factors`` (K = 1 and no adapter if None): (K, H) fp32.

    All K·P (adapter, probe) pairs run in one forward; differentiable in the factors.
    """
    k = 1 if factors is None else num_adapters(factors)
    input_ids = probes.input_ids.repeat(k, 1)  # (K*P, T): row n belongs to adapter n // P
    attention_mask = probes.attention_mask.repeat(k, 1)  # (K*P, T)
    adapters = contextlib.nullcontext() if factors is None else lora.apply(factors)
    with adapters:
        states = last_token_states(lora.backbone, input_ids, attention_mask, layer)  # (K*P, H) fp32
    return probe_mean(states, k)  # (K, H)


@torch.no_grad()
def base_activation(model: nn.Module, probes: ProbeBatch, layer: int = -1) -> Tensor:
    """v(base): (H,) fp32 from the model as it is; nothing is ever injected into it, so it stays pristine."""
    return base_probe_states(model, probes, layer).mean(0)  # (H,)


@torch.no_grad()
def base_probe_states(model: nn.Module, probes: ProbeBatch, layer: int = -1) -> Tensor:
    """v_p(base) of every probe: (P, H) fp32 from the pristine model."""
    return last_token_states(get_backbone(model), probes.input_ids, probes.attention_mask, layer)  # (P, H)
