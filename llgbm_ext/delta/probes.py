"""Probe sets: the fixed texts whose activations define v(M), as versioned data with a content hash.

A probe set is data (``probe_sets/*.json`` or a user JSON file), not code. ``ProbeSet.hash`` covers
everything that changes the resulting activations (texts, chat-template switch, max length,
truncation side, encoding version), so a cache keyed on it can never mix two functionals, the
mistake of the original LLGBM, whose teacher and student deltas used different probes (contract §6.18).

``encode_probes`` is the ONE function that turns a probe set and a tokenizer into a padded batch;
teacher deltas, student deltas and base activations all go through it, so the chat template,
truncation and padding are applied identically everywhere.

Built-in sets: ``generic`` (the 5 Alpaca-style probes of Delta Activations, arXiv 2509.04442) and
``domain:math``, ``domain:code``, ``domain:commonsense`` (5 probes each).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..errors import LLGBMError

PROBE_SET_DIR = Path(__file__).with_name("probe_sets")
ENCODING_VERSION = 1  # bump when encode_probes changes how texts become token ids
TRUNCATION_SIDES = ("left", "right")
PADDING_SIDES = ("left", "right")
_FILE_KEYS = {"probes", "chat_template", "max_length", "truncation_side", "name", "version", "description"}


class ProbeError(LLGBMError):
    """A probe set (name, file or contents) is unknown or invalid."""


@dataclass(frozen=True)
class ProbeSet:
    """A fixed list of probe texts and how to encode them.

    Attributes:
        name: where it came from (``generic``, ``domain:math`` or a file path); not part of the hash.
        texts: the probe texts, in order.
        chat_template: wrap each text as a user turn of the tokenizer's chat template (with the
            generation prompt) instead of encoding it raw; the paper's probes use no template.
        max_length: probes longer than this many tokens are truncated (the paper uses 256).
        truncation_side: which end a too-long probe loses ("right" keeps its beginning).
        version: data version of the set; a changed built-in set gets a new version (and hash).
    """

    name: str
    texts: tuple[str, ...]
    chat_template: bool = False
    max_length: int = 256
    truncation_side: str = "right"
    version: int = 1

    def __post_init__(self):
        object.__setattr__(self, "texts", tuple(self.texts))
        if not self.texts:
            raise ProbeError(f"probe set {self.name!r}: no probe texts")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise ProbeError(f"probe set {self.name!r}: probe {i} must be a non-empty string, got {text!r:.60}")
        if not isinstance(self.chat_template, bool):
            raise ProbeError(f"probe set {self.name!r}: chat_template must be true or false, got {self.chat_template!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ProbeError(f"probe set {self.name!r}: max_length must be a positive integer, got {self.max_length!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ProbeError(f"probe set {self.name!r}: version must be a positive integer, got {self.version!r}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ProbeError(
                f"probe set {self.name!r}: truncation_side must be one of {TRUNCATION_SIDES}, got {self.truncation_side!r}"
            )

    @property
    def hash(self) -> str:
        """16 hex digits of SHA-256 over everything that changes the activations (not the name)."""
        content = {
            "encoding": ENCODING_VERSION,
            "texts": list(self.texts),
            "chat_template": self.chat_template,
            "max_length": self.max_length,
            "truncation_side": self.truncation_side,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)


def builtin_probe_sets() -> list[str]:
    """Names accepted by ``get_probe_set`` besides file paths."""
    names = sorted(p.stem for p in PROBE_SET_DIR.glob("*.json"))
    return ["generic"] + [f"domain:{n}" for n in names if n != "generic"]


def load_probe_file(path: str | os.PathLike, name: str | None = None) -> ProbeSet:
    """Read a probe set from JSON: a list of strings, or ``{"probes": [...], "chat_template": bool,
    "max_length": int, "truncation_side": "left"|"right"}`` (all but ``probes`` optional)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeError(f"{path}: no such probe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeError(f"{path}: cannot read probe file ({e})") from None
    if not raw.strip():
        raise ProbeError(f"{path}: empty probe file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{path}: not valid JSON ({e})") from None
    options = {}
    if isinstance(data, dict):
        unknown = sorted(set(data) - _FILE_KEYS)
        if unknown:
            raise ProbeError(f"{path}: unknown key {unknown[0]!r} (allowed: {sorted(_FILE_KEYS)})")
        if "probes" not in data:
            raise ProbeError(f"{path}: missing key 'probes' (a list of strings)")
        options = {k: data[k] for k in ("chat_template", "max_length", "truncation_side", "version") if k in data}
        data = data["probes"]
    if not isinstance(data, list):
        raise ProbeError(f"{path}: expected a list of probe strings or an object with 'probes', got {type(data).__name__}")
    if not data:
        raise ProbeError(f"{path}: the probe list is empty")
    bad = next((i for i, t in enumerate(data) if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise ProbeError(f"{path}: probe {bad} must be a non-empty string, got {data[bad]!r:.60}")
    return ProbeSet(name=name or str(path), texts=tuple(data), **options)  # its errors name the set (the file)


def get_probe_set(
    spec: str | os.PathLike = "generic",
    *,
    chat_template: bool | None = None,
    max_length: int | None = None,
    truncation_side: str | None = None,
) -> ProbeSet:
    """A probe set by name (``generic``, ``domain:math`` ...) or JSON file path; keyword arguments
    that are not None override the set's encoding options (and so its hash)."""
    key = str(spec)
    if key == "generic" or key.startswith("domain:"):
        stem = "generic" if key == "generic" else key.split(":", 1)[1]
        path = PROBE_SET_DIR / f"{stem}.json"
        if stem == "generic" and key != "generic" or not path.is_file():
            raise ProbeError(f"unknown probe set {key!r}: use one of {builtin_probe_sets()} or a JSON file")
        probes = load_probe_file(path, name=key)
    elif Path(key).is_file():
        probes = load_probe_file(key)
    else:
        raise ProbeError(f"unknown probe set {key!r}: use one of {builtin_probe_sets()} or an existing JSON file")
    overrides = {"chat_template": chat_template, "max_length": max_length, "truncation_side": truncation_side}
    return replace(probes, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class ProbeBatch:
    """Encoded probes: ``input_ids`` and ``attention_mask`` of shape (P, T), padded on ``padding_side``."""

    input_ids: Tensor
    attention_mask: Tensor
    padding_side: str

    def to(self, device: str | torch.device) -> "ProbeBatch":
        return ProbeBatch(self.input_ids.to(device), self.attention_mask.to(device), self.padding_side)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _token_ids(probes: ProbeSet, tokenizer, text: str) -> list[int]:
    if not probes.chat_template:
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ProbeError(f"probe set {probes.name!r} asks for a chat template, but tokenizer {where} has none")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]  # the template holds any BOS itself


def encode_probes(probes: ProbeSet, tokenizer, padding_side: str = "right") -> ProbeBatch:
    """Tokenize every probe alone (optionally through the chat template), truncate it to
    ``max_length`` on its truncation side, and pad all to the longest on ``padding_side``."""
    if padding_side not in PADDING_SIDES:
        raise ProbeError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    rows = []
    for i, text in enumerate(probes.texts):
        ids = list(_token_ids(probes, tokenizer, text))
        if not ids:
            raise ProbeError(f"probe set {probes.name!r}: probe {i} encodes to no tokens")
        keep = probes.max_length
        rows.append(ids[:keep] if probes.truncation_side == "right" else ids[-keep:])
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (P, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (P, T)
    for i, ids in enumerate(rows):  # P is a handful of probes, encoded once
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
    return ProbeBatch(input_ids, attention_mask, padding_side)
