"""The pretrained ``tiny`` shipped inside the package, so that it is the same model everywhere and needs no pretraining.

``assets/tiny`` holds the model that ``models.pretrain`` builds with its default recipe (``PretrainConfig()``),
pretrained once; its ``llgbm_model.json`` records the recipe (tiny and pretraining versions, the
PretrainConfig fields), the torch version that built it and the sha256 of its weights. ``tiny`` resolves
to that directory itself, which is only ever read. Pretraining again (``llgbm model tiny --rebuild``)
on another CPU type or torch version may round differently and give other weights.

Its config and tokenizer files are in the form that transformers 4.49 (DnD's pin) and 5 both read:
``rope_theta`` next to ``rope_parameters``, and ``additional_special_tokens`` instead of transformers 5's
list of ``extra_special_tokens``, which 4.49 cannot load. To ship a new recipe: rebuild, copy the
rebuilt directory into assets/tiny and make those two edits (tests/test_shipped_tiny.py checks the
recipe, the checksum and the two keys).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from ..errors import ModelError

SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
WEIGHTS = "model.safetensors"
RECIPE = "llgbm_model.json"


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_recipe() -> dict:
    """The shipped ``llgbm_model.json``: versions, PretrainConfig fields, torch version, sha256 of the weights."""
    path = SHIPPED_DIR / RECIPE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable ({e}); reinstall llgbm-ext") from None


def shipped_tiny_model() -> Path:
    """Directory of the shipped ``tiny``, once its weights match the recorded sha256 (4 MB: milliseconds)."""
    expected = shipped_recipe()["sha256"]
    weights = SHIPPED_DIR / WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: missing from the installed package; reinstall llgbm-ext")
    actual = file_sha256(weights)
    if actual != expected:
        raise ModelError(f"{weights}: sha256 {actual[:16]}… is not the recorded {expected[:16]}…; "
                         "reinstall llgbm-ext")
    return SHIPPED_DIR


def weight_differences(reference: Path, other: Path) -> dict[str, float]:
    """Max |Δ| per tensor between two model directories' weights; inf where a tensor is missing or reshaped."""
    from safetensors.torch import load_file

    a, b = load_file(reference / WEIGHTS), load_file(other / WEIGHTS)
    return {name: (a[name].double() - b[name].double()).abs().max().item()
            if name in a and name in b and a[name].shape == b[name].shape else math.inf
            for name in sorted(a.keys() | b.keys())}
