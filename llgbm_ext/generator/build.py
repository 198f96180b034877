"""Generator configuration and builder: ``GeneratorConfig`` + a layout -> ``LoraGenerator``.

A generator maps a condition (the embedded prompts of one task, batched) to DnD tokens
``(B, N_tok, H, W)`` of a ``LoraLayout``, which ``llgbm_ext.lora.tokens.detokenize`` turns into LoRA
factors. Two bodies:

* ``"hyperconv"`` (DnD's decoder): condition ``(B, N, L, C)`` = token-level text features of N prompts
  truncated / zero-padded to L tokens (``TextEncoder.condition(..., level="tokens")``);
* ``"simple"`` (pooled MLP hypernetwork): condition ``(B, N, C)`` = pooled sentence embeddings
  (``level="pooled"``); any N.

Initialisation. An untrained body writes random values into every cell, scale-code cells included,
so every chunk decodes with a random mean and std and lora_B comes out as large as lora_A: on the
``tiny`` layout, ``‖scaling·B·A‖ / ‖W‖`` against the tiny base model's weights is 5–20 % (hyperconv)
and 60–75 % (simple) at DnD's plain initialisation, i.e. adapters as strong as trained ones but with
random content, which the first delta-loss steps would spend undoing. Both A and B near zero is no
better: ``B·A`` then has no gradient. So the output is

    tokens = prior + body(condition),   body's last layer initialised ``output_scale`` (0.01) × default,

where ``prior`` (a buffer, not trained, so weight decay cannot pull its scale codes towards the code
of std 0.11) holds the tokens of a PEFT-like initial adapter: A ~ N(0, 1/(3·in)) (the variance of
PEFT's kaiming-uniform A) and B ~ N(0, ``prior_b_std``²) (1e-3: small but not zero, since a zero
chunk tokenizes to z = 0 with the code of std 0, where its cells get no gradient). At initialisation
every condition decodes to nearly this adapter: finite and small (``‖scaling·B·A‖ / ‖W‖`` ≈ 1.5 % on
``tiny``), with condition-dependent token changes of ~0.005.
``prior="none"`` gives DnD's plain parameterisation (used when loading DnD weights).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..errors import LLGBMError
from ..lora.adapters import load_adapter
from ..lora.factors import LoraFactors, factors_from_state_dict
from ..lora.layout import LoraLayout
from ..lora.tokens import detokenize, tokenize
from .hyperconv import Features, HyperConvDecoder
from .simple import SimpleGenerator

Kind = Literal["hyperconv", "simple"]
Prior = Literal["adapter", "teacher_init", "none"]


class GeneratorError(LLGBMError):
    """A generator configuration or checkpoint is inconsistent with the layout or with itself."""


@dataclass(frozen=True)
class GeneratorConfig:
    """Size and initialisation of a generator; the layout is given separately to ``build_generator``.
    Read and written with ``llgbm_ext.config`` (YAML, ``key=value`` overrides).

    Attributes:
        kind: ``"hyperconv"`` (DnD's HyperConv decoder) or ``"simple"`` (pooled MLP hypernetwork).
        num_prompts: N, prompts per condition (the simple kind accepts any N).
        max_length: L, text tokens per prompt in a token-level condition (hyperconv only).
        embed_dim: C, width of the text features (384 for MiniLM).
        features: hyperconv only: the hidden (L, H, W) triples between the condition (N, L, C) and the
            output (N_tok, H_tok, W_tok); both ends come from the fields above and the layout.
        kernel_size: hyperconv convolution size (odd).
        hidden_size: simple only: width D of the task vector and token embeddings.
        prior: ``"adapter"`` (tokens of a PEFT-like initial adapter, see module docstring),
            ``"teacher_init"`` (the same, with the teachers' shared initial A: the trainer sets it from
            the teacher set, so the generator starts where every teacher started) or ``"none"``.
        prior_b_std: std of the prior adapter's lora_B.
        output_scale: factor applied to the initial weights of the body's last layer.
        shared_offset: add a learned, condition-independent token offset (one free parameter per output
            cell, initialised at 0): what every task's adapter shares is then learned per cell, as a
            single LoRA would be, and the body only has to write what differs between tasks. The
            HyperConv body's separable layers cannot write an arbitrary per-cell pattern themselves.
        seed: seeds the body's initialisation and the prior adapter.
    """

    kind: Kind = "hyperconv"
    num_prompts: int = 8
    max_length: int = 16
    embed_dim: int = 384
    features: tuple[Features, ...] = ((16, 8, 32),)
    kernel_size: int = 3
    hidden_size: int = 128
    prior: Prior = "adapter"
    prior_b_std: float = 1e-3
    output_scale: float = 0.01
    shared_offset: bool = False
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "features", tuple(tuple(int(x) for x in f) for f in self.features))
        if self.kind not in get_args(Kind):
            raise GeneratorError(f"generator kind must be one of {list(get_args(Kind))}, got {self.kind!r}")
        if self.prior not in get_args(Prior):
            raise GeneratorError(f"generator prior must be one of {list(get_args(Prior))}, got {self.prior!r}")
        for name in ("num_prompts", "max_length", "embed_dim", "kernel_size", "hidden_size"):
            if int(getattr(self, name)) <= 0:
                raise GeneratorError(f"generator {name} must be positive, got {getattr(self, name)}")
        if self.kernel_size % 2 == 0:
            raise GeneratorError(f"generator kernel_size must be odd, got {self.kernel_size}")
        if any(len(f) != 3 or min(f) <= 0 for f in self.features):
            raise GeneratorError(f"generator features must be positive (L, H, W) triples, got {list(self.features)}")
        if not (self.prior_b_std >= 0 and self.output_scale > 0 and math.isfinite(self.output_scale)):
            raise GeneratorError("generator prior_b_std must be >= 0 and output_scale positive and finite")

    @property
    def condition_level(self) -> str:
        """What the text encoder must produce: ``"tokens"`` (hyperconv) or ``"pooled"`` (simple)."""
        return "tokens" if self.kind == "hyperconv" else "pooled"

    @property
    def condition_shape(self) -> tuple[int, ...]:
        """Shape of one condition without the batch dim: (N, L, C) for hyperconv, (N, C) for simple."""
        if self.kind == "hyperconv":
            return (self.num_prompts, self.max_length, self.embed_dim)
        return (self.num_prompts, self.embed_dim)

    def hyperconv_features(self, layout: LoraLayout) -> list[Features]:
        """DnD's full ``features`` list: condition shape, hidden triples, (N_tok, H_tok, W_tok)."""
        return [self.condition_shape, *self.features, (layout.num_tokens, *layout.token_size)]


# DnD's Qwen2.5-0.5B commonsense generator (contract §2.1): 128 prompts × 384 MiniLM tokens × 384,
# kernel 9, output (4296, 10, 130); ≈1.113 B parameters. It keeps our initialisation (prior + small last
# layer); load_dnd_state_dict replaces it with a trained DnD generator's weights and zeroes the prior.
DND_QWEN05B_FEATURES = ((128, 200, 300), (128, 100, 256), (256, 50, 200), (512, 50, 200),
                        (1024, 25, 200), (1024, 10, 200), (2048, 10, 200))
NAMED_GENERATORS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(),
    "tiny-simple": GeneratorConfig(kind="simple"),
    "dnd-qwen2.5-0.5b": GeneratorConfig(num_prompts=128, max_length=384, embed_dim=384,
                                        features=DND_QWEN05B_FEATURES, kernel_size=9),
}


def get_generator_config(name: str, **overrides) -> GeneratorConfig:
    """A named config (``tiny``, ``tiny-simple``, ``dnd-qwen2.5-0.5b``) with optional field overrides."""
    if name not in NAMED_GENERATORS:
        raise GeneratorError(f"unknown generator config {name!r}: use one of {sorted(NAMED_GENERATORS)}")
    return replace(NAMED_GENERATORS[name], **{k: v for k, v in overrides.items() if v is not None})


def build_body(cfg: GeneratorConfig, layout: LoraLayout) -> nn.Module:
    """The trainable network alone (no prior), default-initialised; cheap to build on the meta device."""
    if cfg.kind == "hyperconv":
        return HyperConvDecoder(cfg.hyperconv_features(layout), cfg.kernel_size)
    return SimpleGenerator(cfg.embed_dim, layout.num_tokens, layout.token_size, cfg.hidden_size)


def count_parameters(cfg: GeneratorConfig, layout: LoraLayout) -> int:
    """Trainable parameters of a generator, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_body(cfg, layout).parameters())


def prior_tokens(layout: LoraLayout, b_std: float, generator: torch.Generator) -> Tensor:
    """Tokens (N_tok, H, W) of a PEFT-like initial adapter: A ~ N(0, 1/(3·in)), B ~ N(0, b_std²)."""
    factors = {}
    for proj in layout.targets:
        (r, fan_in), (fan_out, _) = layout.factor_shapes(proj)
        a = torch.randn(layout.num_layers, r, fan_in, generator=generator) / math.sqrt(3 * fan_in)
        b = torch.randn(layout.num_layers, fan_out, r, generator=generator) * b_std
        factors[proj] = (a, b)
    return tokenize(factors, layout)


def prior_tokens_from(adapter: str | os.PathLike, layout: LoraLayout, b_std: float, seed: int) -> Tensor:
    """Tokens (N_tok, H, W) of an adapter file's A with B ~ N(0, b_std²) (B must not be exactly zero: a
    zero chunk tokenizes to std 0, where its cells get no gradient); for the teachers' shared init."""
    state = load_adapter(adapter, layout).state_dict
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for proj, (a, b) in factors_from_state_dict(state, layout).items():
        factors[proj] = (a.float(), torch.randn(b.shape, generator=generator) * b_std)
    return tokenize(factors, layout)


class LoraGenerator(nn.Module):
    """condition -> DnD tokens ``prior [+ offset] + body(condition)`` of shape (B, N_tok, H, W), float32.

    ``config.condition_shape`` gives the condition's shape without the batch dim; see the module
    docstring for the initialisation. ``lora_factors`` decodes the tokens differentiably. Keep the
    module in float32 (autocast is fine: the float32 prior makes the sum float32); in bf16 the
    scale codes would be rounded to a grid ~0.004 apart, which moves a small decoded std such as B's
    1e-3 by up to ~25 %.
    """

    def __init__(self, config: GeneratorConfig, layout: LoraLayout):
        super().__init__()
        self.config = config
        self.layout = layout
        rng = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.body = build_body(config, layout)
        last = self.body.output_layer
        with torch.no_grad():
            last.weight.mul_(config.output_scale)
            last.bias.mul_(config.output_scale)
        if config.prior in ("adapter", "teacher_init"):  # teacher_init: replaced by the trainer (set_prior)
            prior = prior_tokens(layout, config.prior_b_std, rng)
        else:
            prior = torch.zeros(layout.num_tokens, *layout.token_size)
        self.register_buffer("prior", prior)
        self.offset = nn.Parameter(torch.zeros_like(prior)) if config.shared_offset else None

    def forward(self, condition: Tensor) -> Tensor:
        tokens = self.prior + self.body(condition)
        return tokens + self.offset if self.offset is not None else tokens

    def lora_factors(self, condition: Tensor) -> LoraFactors:
        """Generated LoRA factors: ``proj -> (A (B, L, r, in), B (B, L, out, r))``, differentiable."""
        return detokenize(self(condition), self.layout)

    def set_prior(self, tokens: Tensor) -> None:
        """Replace the prior by the tokens (N_tok, H, W) of one adapter, e.g. a teacher.

        Use one adapter's tokens, not a mean over adapters: the z-normalised chunk patterns of
        different adapters average towards zero, which decodes to A ≈ B ≈ 0 (no gradient through B·A).
        """
        expected = (self.layout.num_tokens, *self.layout.token_size)
        if tuple(tokens.shape) != expected or not torch.isfinite(tokens).all():
            raise GeneratorError(f"prior tokens must be finite with shape {expected}, got {tuple(tokens.shape)}")
        self.prior.copy_(tokens)


def build_generator(cfg: GeneratorConfig, layout: LoraLayout) -> LoraGenerator:
    """Build a generator for ``layout`` (weights initialised from ``cfg.seed``, RNG state untouched)."""
    output = (layout.num_tokens, *layout.token_size)
    if cfg.kind == "hyperconv" and cfg.features and cfg.features[0] == cfg.condition_shape \
            and cfg.features[-1] == output:
        raise GeneratorError(
            f"generator features start at the condition {cfg.condition_shape} and end at the output {output}: "
            "list only the hidden triples between them"
        )
    return LoraGenerator(cfg, layout)


def load_dnd_state_dict(generator: LoraGenerator, state_dict: dict[str, Tensor]) -> None:
    """Load the weights of a trained DnD generator (``HyperConvDecoderModel*`` checkpoint, keys
    ``model.decoder.module_list.*``; other keys such as ``criterion_weight`` are ignored) and zero the
    prior, since DnD's decoder writes complete tokens."""
    if generator.config.kind != "hyperconv":
        raise GeneratorError("DnD weights need a generator of kind 'hyperconv'")
    body = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith(("model.decoder.", "decoder."))}
    expected = generator.body.state_dict()
    wrong = [k for k in expected if k not in body or tuple(body[k].shape) != tuple(expected[k].shape)]
    if wrong or len(body) != len(expected):
        raise GeneratorError(
            f"DnD state dict does not match the generator config: {len(wrong)} missing or mis-shaped keys "
            f"(first: {wrong[0] if wrong else sorted(set(body) - set(expected))[0]})"
        )
    generator.body.load_state_dict(body)
    generator.prior.zero_()
