"""LoRA layouts: the geometry of a base model's LoRA and how DnD lays it out as 2-D tokens.

A layout fixes everything that tokenizers, generators and adapter files must agree on:
  * PEFT key names  ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight``;
  * shapes          lora_A (r, in), lora_B (out, r);
  * token order     layer by layer; q, k, v, o, up, gate, down (up before gate, as DnD's sort_key);
                    within a module the A-chunks, then the Bᵀ-chunks, each ``chunk`` columns wide;
  * token size      (H, W) >= (r + 2, chunk + 2), both even: the last two rows and columns hold the
                    per-chunk scale code (see ``tokens.py``).

Named layouts reproduce DnD's tokenizers (``Qwen2505LoRA_Tokenizer2D`` ...). Any Qwen2- or
Llama-style ``config.json`` gives a layout too (``layout_from_config``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import LayoutError

# Canonical token order of DnD (workspace/dnd/dataset sort_key): note up_proj before gate_proj.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
PARENT = {p: ("self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for p in PROJECTIONS}
PEFT_PREFIX = "base_model.model."


def peft_key(layer: int, proj: str, factor: str) -> str:
    """PEFT on-disk key of one LoRA factor, e.g. ``peft_key(0, "q_proj", "A")``."""
    return f"{PEFT_PREFIX}model.layers.{layer}.{PARENT[proj]}.{proj}.lora_{factor}.weight"


@dataclass(frozen=True)
class LoraLayout:
    """Geometry of a LoRA on a decoder-only base model and its DnD token layout.

    Attributes:
        name: identifier (a named layout, or derived from a config).
        num_layers: decoder layers.
        hidden_size: model width (in of q/k/v/up/gate, out of o/down).
        intermediate_size: MLP width (out of up/gate, in of down).
        kv_size: out width of k_proj and v_proj (num_kv_heads * head_dim).
        q_size: out width of q_proj = in width of o_proj (num_heads * head_dim).
        rank: LoRA rank r.
        alpha: LoRA alpha; PEFT scaling is alpha / r.
        targets: adapted projections, always in canonical token order.
        chunk: token data width; must divide every adapted projection width.
        token_size: (H, W) of one token; even, and at least (r + 2, chunk + 2).
    """

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    kv_size: int
    q_size: int
    rank: int
    alpha: float
    chunk: int
    token_size: tuple[int, int]
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise LayoutError(f"layout {self.name!r}: targets must be distinct names from {list(PROJECTIONS)}, got {list(targets)}")
        object.__setattr__(self, "targets", tuple(p for p in PROJECTIONS if p in targets))
        object.__setattr__(self, "token_size", tuple(int(x) for x in self.token_size))
        for attr in ("num_layers", "hidden_size", "intermediate_size", "kv_size", "q_size", "rank", "chunk"):
            if int(getattr(self, attr)) <= 0:
                raise LayoutError(f"layout {self.name!r}: {attr} must be positive, got {getattr(self, attr)}")
        for proj in self.targets:
            fan_in, fan_out = self.proj_shape(proj)
            for width in (fan_in, fan_out):
                if width % self.chunk:
                    raise LayoutError(
                        f"layout {self.name!r}: chunk width {self.chunk} does not divide {proj} width {width}"
                    )
        height, width = self.token_size
        if height < self.rank + 2 or width < self.chunk + 2:
            raise LayoutError(
                f"layout {self.name!r}: token_size {self.token_size} is smaller than (rank+2, chunk+2) = "
                f"({self.rank + 2}, {self.chunk + 2}); scale codes would overwrite weights"
            )
        if height % 2 or width % 2:
            raise LayoutError(f"layout {self.name!r}: token_size {self.token_size} must be even in both dimensions")

    # --- geometry -------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """PEFT LoRA scaling alpha / r."""
        return self.alpha / self.rank

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        h, i, kv, q = self.hidden_size, self.intermediate_size, self.kv_size, self.q_size
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "up_proj": (h, i), "gate_proj": (h, i), "down_proj": (i, h),
        }[proj]

    def factor_shapes(self, proj: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of (lora_A, lora_B) for one projection: (r, in) and (out, r)."""
        fan_in, fan_out = self.proj_shape(proj)
        return (self.rank, fan_in), (fan_out, self.rank)

    def tokens_per_module(self, proj: str) -> tuple[int, int]:
        """(number of A-chunk tokens, number of Bᵀ-chunk tokens) of one projection."""
        fan_in, fan_out = self.proj_shape(proj)
        return fan_in // self.chunk, fan_out // self.chunk

    @property
    def tokens_per_layer(self) -> int:
        return sum(sum(self.tokens_per_module(p)) for p in self.targets)

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_layer * self.num_layers

    def keys(self) -> list[str]:
        """All PEFT keys in token order (A before B within a module)."""
        return [peft_key(i, p, f) for i in range(self.num_layers) for p in self.targets for f in ("A", "B")]

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT key -> expected tensor shape."""
        shapes = {}
        for i in range(self.num_layers):
            for p in self.targets:
                a_shape, b_shape = self.factor_shapes(p)
                shapes[peft_key(i, p, "A")] = a_shape
                shapes[peft_key(i, p, "B")] = b_shape
        return shapes

    def token_spans(self) -> list[tuple[int, str, str, int, int]]:
        """(layer, proj, factor, first token, number of tokens) for every factor, in token order."""
        spans, start = [], 0
        for i in range(self.num_layers):
            for p in self.targets:
                for factor, count in zip(("A", "B"), self.tokens_per_module(p)):
                    spans.append((i, p, factor, start, count))
                    start += count
        return spans

    # --- PEFT adapter_config.json ---------------------------------------------------------------
    def adapter_config(self, base_model_name_or_path: str | None = None) -> dict:
        """A PEFT ``adapter_config.json`` for adapters of this layout (as DnD's configs/Qwen*)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": list(self.targets),
            "fan_in_fan_out": False,
            "use_dora": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_size"] = list(self.token_size)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraLayout":
        try:
            return cls(**{**d, "token_size": tuple(d["token_size"]), "targets": tuple(d.get("targets", PROJECTIONS))})
        except (TypeError, KeyError) as e:
            raise LayoutError(f"invalid layout description: {e}") from None


def _qwen_layout(name, layers, hidden, inter, kv, rank, chunk):
    alpha = 2 * rank  # DnD's adapters: r 8 / alpha 16 (0.5B), r 16 / alpha 32 (1.5B, 7B)
    return LoraLayout(name, layers, hidden, inter, kv, hidden, rank, alpha, chunk, (rank + 2, chunk + 2))


# Embedded tiny Qwen2 model (llgbm_ext.models.tiny): hidden 128, intermediate 384, 4 layers, 4 heads,
# 2 KV heads of width 32.
TINY = _qwen_layout("tiny", 4, 128, 384, 64, 8, 64)

NAMED_LAYOUTS: dict[str, LoraLayout] = {
    "qwen2.5-0.5b": _qwen_layout("qwen2.5-0.5b", 24, 896, 4864, 128, 8, 128),  # 4296 tokens (10, 130)
    "qwen2.5-1.5b": _qwen_layout("qwen2.5-1.5b", 28, 1536, 8960, 256, 16, 256),  # 4508 tokens (18, 258)
    "qwen2.5-7b": _qwen_layout("qwen2.5-7b", 28, 3584, 18944, 512, 16, 512),  # 4928 tokens (18, 514)
    "tiny": TINY,
}


def layout_from_config(
    config: dict | str | os.PathLike,
    *,
    rank: int = 8,
    alpha: float | None = None,
    chunk: int | None = None,
    token_size: tuple[int, int] | None = None,
    targets: tuple[str, ...] = PROJECTIONS,
    name: str | None = None,
) -> LoraLayout:
    """Derive a layout from a Qwen2- or Llama-style ``config.json`` (dict, file or model directory).

    The chunk width defaults to the greatest common divisor of the adapted projection widths, which
    gives DnD's 128 / 256 / 512 for Qwen2.5-0.5B / 1.5B / 7B. The token size defaults to the
    smallest even size that holds a chunk and the scale code.
    """
    source = "config"
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        source = str(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayoutError(f"{path}: not valid JSON ({e})") from None
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
        config = config["text_config"]
    try:
        hidden = int(config["hidden_size"])
        inter = int(config["intermediate_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except KeyError as e:
        raise LayoutError(f"{source}: missing key {e.args[0]!r} (need a Qwen2- or Llama-style config)") from None
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_size = int(config.get("num_key_value_heads") or heads) * head_dim
    q_size = heads * head_dim
    widths = {
        "q_proj": (hidden, q_size), "k_proj": (hidden, kv_size), "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden), "up_proj": (hidden, inter), "gate_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    chunk = int(chunk) if chunk else math.gcd(*(w for p in targets if p in widths for w in widths[p]))
    if token_size is None:
        token_size = (rank + 2 + rank % 2, chunk + 2 + chunk % 2)
    return LoraLayout(
        name=name or str(config.get("_name_or_path") or config.get("model_type") or "derived"),
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        kv_size=kv_size,
        q_size=q_size,
        rank=int(rank),
        alpha=float(alpha) if alpha is not None else 2.0 * rank,
        chunk=chunk,
        token_size=tuple(token_size),
        targets=tuple(targets),
    )


def get_layout(name_or_path: str | os.PathLike, **overrides) -> LoraLayout:
    """A named layout (``qwen2.5-0.5b``, ``qwen2.5-1.5b``, ``qwen2.5-7b``, ``tiny``), or one derived
    from a model directory / ``config.json``; keyword overrides (rank, alpha, ...) replace fields."""
    key = str(name_or_path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if key.lower() in NAMED_LAYOUTS:
        layout = NAMED_LAYOUTS[key.lower()]
        if not overrides:
            return layout
        if ("rank" in overrides or "chunk" in overrides) and "token_size" not in overrides:
            rank, chunk = overrides.get("rank", layout.rank), overrides.get("chunk", layout.chunk)
            overrides["token_size"] = (rank + 2 + rank % 2, chunk + 2 + chunk % 2)
        return replace(layout, **overrides)
    path = Path(key)
    if path.is_dir() and (path / "config.json").is_file() or path.is_file() and path.suffix == ".json":
        return layout_from_config(path, **overrides)
    raise LayoutError(
        f"unknown layout {key!r}: use one of {sorted(NAMED_LAYOUTS)} or a model directory holding config.json"
    )
