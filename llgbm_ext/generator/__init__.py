"""Prompt-to-LoRA generators and the frozen text encoder that embeds their condition prompts.

Typical use (the trainer's view)::

    layout = get_layout("tiny")
    cfg = get_generator_config("tiny")                       # or GeneratorConfig(...)
    encoder = TextEncoder(TextEncoderConfig(max_length=cfg.max_length), EmbeddingCache())
    generator = build_generator(cfg, layout)
    condition = encoder.condition(prompt_lists, level=cfg.condition_level)   # (B, *cfg.condition_shape)
    tokens = generator(condition)                            # (B, N_tok, H, W), DnD's token layout
    factors = generator.lora_factors(condition)              # proj -> (A, B), differentiable

Files: ``text_encoder.py`` (encoders + embedding cache), ``hyperconv.py`` (DnD's HyperConv decoder),
``simple.py`` (pooled MLP hypernetwork), ``build.py`` (config, builder, initialisation).
"""

from .build import (
    NAMED_GENERATORS,
    GeneratorConfig,
    GeneratorError,
    LoraGenerator,
    build_generator,
    count_parameters,
    get_generator_config,
    load_dnd_state_dict,
)
from .text_encoder import EmbeddingCache, EncoderError, TextEncoder, TextEncoderConfig

__all__ = [
    "NAMED_GENERATORS", "GeneratorConfig", "GeneratorError", "LoraGenerator", "build_generator",
    "count_parameters", "get_generator_config", "load_dnd_state_dict",
    "EmbeddingCache", "EncoderError", "TextEncoder", "TextEncoderConfig",
]
