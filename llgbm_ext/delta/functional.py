"""Batched functional LoRA: K different LoRAs on one frozen base model, in one differentiable forward.

``FunctionalLoRA(model, layout).apply(factors)`` is a context manager. Inside it, every target
``nn.Linear`` of the base model (``model.model.layers[i].self_attn.q_proj`` ... ``mlp.down_proj``,
Qwen2 and Llama naming) carries a forward hook that adds each adapter's low-rank update to its rows:

    out = base(x) + scaling * (x @ A_kᵀ) @ B_kᵀ        for the rows of adapter k

Factors carry a leading batch dim K (``A: (K, L, r, in)``, ``B: (K, L, out, r)``; see
``llgbm_ext.lora.factors``). For a batch of N = K·P sequences, row n uses adapter n // P: the rows
of one adapter are contiguous. The update is two batched matmuls over a (K, P·T, in) view of the
input, so K adapters cost one base forward plus rank-r work, with no Python loop over rows or
adapters, no copy of a base weight and no change to any base weight; gradients reach every A and B.

This keeps the public name of the original LLGBM's ``FunctionalLoRA`` and fixes its problems
(dnd-contract §4.4, §6.27, §6.29):
  * it applied one adapter per forward, looped over the batch in Python -> K adapters, one forward;
  * its hooks stayed registered for the object's lifetime, and a second instance stacked another
    set -> hooks exist only inside ``apply`` (removed in ``finally``, also on errors), and a second
    ``apply`` on the same model while one is open is refused;
  * adapters were matched by key strings, silently applying nothing on a mismatch -> factors are
    checked against the layout and the model's modules, and every target must be present;
  * its legacy ``functional_call`` mode built dense ΔW = B·A -> the update is always low rank.

Gradient checkpointing of the base model (transformers' ``gradient_checkpointing_enable`` with
``use_reentrant=False``; transformers checkpoints only in training mode) recomputes a layer during
backward, possibly after the ``apply`` block has ended and its hooks are gone. So while the block
is open, each layer's checkpoint function is wrapped: the function it checkpoints re-attaches that
layer's hooks (same factors) whenever it runs without them, i.e. during such a recomputation.
Hooks and that wrapper are all ``apply`` ever puts on the base model; both are undone in ``finally``.
Reentrant checkpointing is refused: its forward runs without autograd, so A and B would get no
gradient through the frozen base.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import LayoutError, ModelError
from ..lora.factors import LoraFactors
from ..lora.layout import PARENT, LoraLayout

# backbone -> hook handles of the ``apply`` block open on it (one at most)
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` of a ``*ForCausalLM``)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: no decoder layers found (expected Qwen2/Llama-style model.model.layers)")
    return backbone


def num_adapters(factors: LoraFactors) -> int:
    """K of factors with a leading batch dim, 1 for the factors of a single adapter."""
    if not factors:
        raise LayoutError("no LoRA factors given")
    a, _ = next(iter(factors.values()))
    return 1 if a.dim() == 3 else a.shape[0]


def _lora_hook(a: Tensor, b: Tensor) -> Callable:
    """Forward hook adding (x @ a[k]ᵀ) @ b[k]ᵀ to the rows of adapter k; ``b`` is pre-scaled."""

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        x = inputs[0]  # (N, T, in), N = K*P
        k = a.shape[0]
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} sequences cannot be split among {k} adapters")
        xs = x.reshape(k, -1, x.shape[-1])  # (K, P*T, in): the rows of adapter k are contiguous
        a_t = a.to(x.device, x.dtype).transpose(1, 2)  # (K, in, r)
        b_t = b.to(x.device, x.dtype).transpose(1, 2)  # (K, r, out)
        xa = torch.bmm(xs, a_t)  # (K, P*T, r)
        out = torch.baddbmm(output.reshape(k, -1, output.shape[-1]), xa, b_t)  # (K, P*T, out) = base + x A_kᵀ B_kᵀ
        return out.view(output.shape)  # (N, T, out)

    return hook


class FunctionalLoRA:
    """Applies batches of LoRA factors to a frozen base model through temporary forward hooks.

    Args:
        model: a Qwen2/Llama-style causal LM (or its backbone); never modified.
        layout: the LoRA geometry; its targets, shapes and scaling (alpha / r) must fit the model.
    """

    def __init__(self, model: nn.Module, layout: LoraLayout):
        self.model = model
        self.backbone = get_backbone(model)
        self.layout = layout
        layers = self.backbone.layers
        if len(layers) != layout.num_layers:
            raise LayoutError(f"layout {layout.name!r} has {layout.num_layers} layers, the model has {len(layers)}")
        self.targets: dict[tuple[int, str], nn.Linear] = {}
        for i, layer in enumerate(layers):
            for proj in layout.targets:
                name = f"layers.{i}.{PARENT[proj]}.{proj}"
                module = getattr(getattr(layer, PARENT[proj], None), proj, None)
                if not isinstance(module, nn.Linear):
                    kind = type(module).__name__ if module is not None else "missing"
                    raise ModelError(
                        f"{name} is {kind}, expected an nn.Linear (a model with PEFT layers injected is not a pristine base)"
                    )
                if (module.in_features, module.out_features) != layout.proj_shape(proj):
                    raise LayoutError(
                        f"{name} is {module.in_features}->{module.out_features}, layout {layout.name!r} "
                        f"expects {layout.proj_shape(proj)[0]}->{layout.proj_shape(proj)[1]}"
                    )
                self.targets[(i, proj)] = module

    def _updates(self, factors: LoraFactors, scaling: float) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """Per (layer, projection): A (K, r, in) and scaling·B (K, out, r), after checking shapes."""
        if set(factors) != set(self.layout.targets):
            raise LayoutError(
                f"factors hold {sorted(factors)}, layout {self.layout.name!r} targets {sorted(self.layout.targets)}"
            )
        updates, k = {}, num_adapters(factors)
        for proj in self.layout.targets:
            a, b = factors[proj]
            if a.dim() == 3:
                a, b = a.unsqueeze(0), b.unsqueeze(0)  # a single adapter: K = 1
            a_shape, b_shape = self.layout.factor_shapes(proj)
            expected_a, expected_b = (k, self.layout.num_layers, *a_shape), (k, self.layout.num_layers, *b_shape)
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise LayoutError(
                    f"{proj}: factors have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                    f"expected A {expected_a}, B {expected_b} (layout {self.layout.name!r})"
                )
            # unbind: one autograd node per projection that stacks the per-layer gradients
            for i, (a_i, b_i) in enumerate(zip(a.unbind(1), (b * scaling).unbind(1))):
                updates[(i, proj)] = (a_i, b_i)  # (K, r, in), (K, out, r)
        return updates

    def _attach(self, updates: dict[tuple[int, str], tuple[Tensor, Tensor]]) -> list:
        return [self.targets[key].register_forward_hook(_lora_hook(a, b)) for key, (a, b) in updates.items()]

    @contextlib.contextmanager
    def apply(self, factors: LoraFactors, scaling: float | None = None) -> Iterator[None]:
        """Within the block, forwards of the model add the K adapters of ``factors`` (row n of a
        batch of K·P sequences uses adapter n // P). ``scaling`` defaults to the layout's alpha / r."""
        updates = self._updates(factors, self.layout.scaling if scaling is None else scaling)
        if self.backbone in _APPLIED:
            raise RuntimeError("adapters are already applied to this model; FunctionalLoRA.apply blocks cannot nest")
        handles: list = []
        checkpoint_funcs: dict[int, Callable] = {}
        _APPLIED[self.backbone] = handles
        try:
            handles += self._attach(updates)
            for i, layer in enumerate(self.backbone.layers):
                func = vars(layer).get("_gradient_checkpointing_func")
                if func is None:
                    continue
                known = getattr(func, "keywords", None)  # transformers sets a functools.partial of checkpoint
                reentrant = known is not None and known.get("use_reentrant") is not False  # torch's default is True
                if getattr(layer, "gradient_checkpointing", False) and reentrant:
                    raise ModelError(
                        "the base model uses reentrant gradient checkpointing, which gives generated LoRAs no gradient; "
                        "enable checkpointing with {'use_reentrant': False} in its checkpointing kwargs"
                    )
                checkpoint_funcs[i] = func
                layer._gradient_checkpointing_func = self._with_adapters(func, i, updates, handles)
            yield
        finally:
            for handle in handles:
                handle.remove()
            handles.clear()
            for i, func in checkpoint_funcs.items():
                self.backbone.layers[i]._gradient_checkpointing_func = func
            _APPLIED.pop(self.backbone, None)

    def _with_adapters(self, checkpoint: Callable, layer: int, updates: dict, live_handles: list) -> Callable:
        """Wrap a layer's checkpoint function so its recomputation sees this block's adapters."""
        layer_updates = {key: ab for key, ab in updates.items() if key[0] == layer}

        def adapted(function: Callable) -> Callable:
            def run(*args, **kwargs):
                if live_handles:  # the forward itself, or a backward inside the block: hooks attached
                    return function(*args, **kwargs)
                if self.backbone in _APPLIED:
                    raise RuntimeError(
                        "a checkpointed layer is recomputed while other adapters are applied; call backward first"
                    )
                handles = self._attach(layer_updates)  # recomputation in a backward after the block
                try:
                    return function(*args, **kwargs)
                finally:
                    for handle in handles:
                        handle.remove()

            return run

        def checkpoint_with_adapters(function: Callable, *args, **kwargs):
            return checkpoint(adapted(function), *args, **kwargs)

        return checkpoint_with_adapters


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint the decoder layers of a frozen base model that stays in eval mode.

    transformers checkpoints only modules in training mode (the backbone in 4.x, each decoder layer
    in 5.x). Only those flags are set, non-recursively: attention, MLP and norm submodules stay in
    eval mode, so nothing that depends on ``training`` (dropout) changes. Non-reentrant checkpointing,
    so that ``FunctionalLoRA`` adapters get gradients.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone = get_backbone(model)
    backbone.training = True
    for layer in backbone.layers:
        layer.training = True
