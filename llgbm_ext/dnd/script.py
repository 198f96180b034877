"""The LoRA layout a DnD training script declares, read from its source without running it.

DnD's scripts do all their set-up at import time (contract §2.1), so the runner reads what fixes the
generator's tokens from the source (``ast``) before starting one, and refuses a plugin config whose
layout disagrees, instead of failing at the first step after DnD's whole set-up:

* the LoRA tokenizer imported from ``workspace.dnd.tokenizer`` (``Qwen2515LoRA_Tokenizer2D`` is the
  ``qwen2.5-1.5b`` layout);
* ``"token_size": (H, W)`` of the script's config dict;
* the generator's output, the last entry of ``"features"`` (``(N_tok, H, W)``, e.g. (4508, 18, 258)).

Values that are not literals (the smoke task's ``TINY.token_size``) count as not declared.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import LLGBMError
from ..lora.layout import LoraLayout, get_layout
from ..models.registry import resolve_base_model
from .config import DnDPluginConfig, under_root

# DnD's Qwen LoRA tokenizers and the named layout each one tokenizes (contract §1.3). The Qwen2.5-VL-3B
# tokenizer has no named layout: its runs name the base model's directory as layout.
DND_TOKENIZERS = {
    "Qwen2505LoRA_Tokenizer2D": "qwen2.5-0.5b",
    "Qwen2515LoRA_Tokenizer2D": "qwen2.5-1.5b",
    "Qwen257BLoRA_Tokenizer2D": "qwen2.5-7b",
}


# what fixes a LoRA's tokens besides the token size (alpha only scales the adapter)
_GEOMETRY = ("num_layers", "hidden_size", "intermediate_size", "kv_size", "q_size", "rank", "chunk", "targets")


class ScriptError(LLGBMError):
    """A DnD script cannot be read, or its layout disagrees with the plugin config."""


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _ints(value, length: int) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and len(value) == length and all(type(v) is int for v in value):
        return tuple(value)
    return None


@dataclass(frozen=True)
class ScriptLayout:
    """What a script declares: its DnD tokenizer, token size and generator output (None: not declared)."""

    tokenizer: str | None = None
    token_size: tuple[int, int] | None = None
    output: tuple[int, int, int] | None = None

    @classmethod
    def read(cls, script: str | os.PathLike) -> ScriptLayout:
        """Parse ``script`` (never run it)."""
        try:
            tree = ast.parse(Path(script).read_text(encoding="utf-8"), filename=str(script))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
            raise ScriptError(f"{script}: cannot read it as a Python script ({type(e).__name__}: {e})") from None
        tokenizer = token_size = output = None
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workspace.dnd.tokenizer"):
                tokenizer = next((a.name for a in node.names if a.name in DND_TOKENIZERS), tokenizer)
            elif isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    name = _literal(key) if key is not None else None
                    if name == "token_size":
                        token_size = _ints(_literal(value), 2) or token_size
                    elif name == "features" and isinstance(value, (ast.List, ast.Tuple)) and value.elts:
                        output = _ints(_literal(value.elts[-1]), 3) or output
        return cls(tokenizer, token_size, output)

    @property
    def layout_name(self) -> str | None:
        """The named layout of the script's tokenizer, if it uses one of DnD's Qwen tokenizers."""
        return DND_TOKENIZERS.get(self.tokenizer) if self.tokenizer else None

    def conflicts(self, layout: LoraLayout) -> list[str]:
        """What the script declares that ``layout`` does not match (empty: nothing)."""
        found = []
        if self.layout_name:
            named = get_layout(self.layout_name)
            if any(getattr(named, g) != getattr(layout, g) for g in _GEOMETRY):
                found.append(f"its tokenizer {self.tokenizer} tokenizes {self.layout_name} LoRAs")
        if self.token_size and self.token_size != layout.token_size:
            found.append(f"token_size {self.token_size}")
        if self.output and self.output != (layout.num_tokens, *layout.token_size):
            found.append(f"generator output {self.output}")
        return found

    def check(self, layout: LoraLayout, script: str | os.PathLike) -> None:
        """Raise a one-line ScriptError if the script's declarations disagree with ``layout``."""
        conflicts = self.conflicts(layout)
        if conflicts:
            raise ScriptError(
                f"{script}: {'; '.join(conflicts)}, but the plugin config's layout {layout.name!r} makes "
                f"{layout.num_tokens} tokens of {layout.token_size}: set layout (and base_model) in --llgbm-config "
                "to the script's model, or layout: auto"
            )


def resolve_layout(config: DnDPluginConfig, script: str | os.PathLike | None, root: Path,
                   required: bool = False) -> DnDPluginConfig:
    """``config`` with its layout fixed before the script runs: ``auto`` becomes the layout of the
    script's DnD tokenizer, else the base model's (its directory); an explicit layout must match what
    the script declares (one-line ScriptError otherwise). ``auto`` stays when nothing needs it (not
    ``required``, no behaviour term and no DnD tokenizer in the script)."""
    declared = ScriptLayout.read(script) if script is not None else ScriptLayout()
    value = config.layout
    if value == "auto":
        value = declared.layout_name
        if value is None and (config.uses_delta or required):
            value = str(resolve_base_model(under_root(config.base_model, root)))
        if value is None:
            return config
    declared.check(get_layout(under_root(value, root)), script)
    return replace(config, layout=value)
