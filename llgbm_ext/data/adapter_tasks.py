"""Which task an adapter file belongs to, from its metadata or its name.

Order: the ``"task"`` key of ``prompts.json`` / ``manifest.json`` beside the adapter; else its own
name, then its folder's name, matched against known task names (case-insensitive, ``-`` read as
``_``; an exact match or the longest task name followed by ``_`` or ``.``, so ``kind_3_seed1`` is
``kind_3`` but ``kind_30`` is not, and DnD's ``ARC-e`` folder is ``arc_e``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterError

METADATA_FILES = ("prompts.json", "manifest.json")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def match_task(name: str, tasks: list[str]) -> str | None:
    """The evaluated task a name refers to: an exact match, or the longest task followed by ``_``/``.``."""
    key = _normalise(name)
    hits = [t for t in tasks if key == _normalise(t) or (key.startswith(_normalise(t)) and key[len(t)] in "_.")]
    return max(hits, key=len) if hits else None


def adapter_metadata(path: Path) -> dict:
    """The JSON object of the first metadata file beside an adapter, or {}."""
    folder = path if path.is_dir() else path.parent
    for name in METADATA_FILES:
        file = folder / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AdapterError(f"{file}: not valid JSON ({e})") from None
            if isinstance(data, dict):
                return data
    return {}


def adapter_task(path: Path, tasks: list[str] | None = None) -> tuple[str | None, bool]:
    """(task, generated?) of an adapter. Without known ``tasks``, the name fallback is the folder's name."""
    meta = adapter_metadata(path)
    generated = meta.get("generated") is True or meta.get("source") == "generated"
    if isinstance(meta.get("task"), str):
        return (match_task(meta["task"], tasks) if tasks else None) or meta["task"], generated
    if tasks is None:
        return path.parent.name, generated
    own = path.name if path.is_dir() else path.stem
    return match_task(own, tasks) or match_task(path.parent.name, tasks), generated
