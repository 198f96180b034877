"""Whether a Python environment runs the DnD plugin and still holds DnD's pinned stack (``llgbm dnd check-env``).

DnD's environment pins transformers 4.49.0 and accelerate 1.2.1 (its ``requirements.txt``) and, through
LLaMA-Factory 0.9.2, bounds peft, tokenizers and numpy. ``pip install -e .`` would move packages to
llgbm_ext's own ranges, so the plugin goes in with ``pip install --no-deps -e .`` and this check says,
for every package the plugin imports and every package those pins name:

* that it is installed within llgbm_ext's declared range (its installed metadata, i.e. setup.cfg's
  ``install_requires``), for the packages the plugin imports (``PLUGIN_PACKAGES``);
* that DnD's pins hold: ``<dnd-root>/requirements.txt``, and LLaMA-Factory's own requirements where it
  is installed (else the bounds of the version DnD installs, ``LLAMAFACTORY_0_9_2``);
* that the plugin's modules import.

llgbm_ext's other dependencies (peft, sentence-transformers, gguf) serve its own trainer, evaluation
and model conversion, not the plugin, so the DnD stack's older peft is no problem.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from ..errors import LLGBMError

# what the plugin (llgbm_ext.dnd and what it imports) needs at run time, by distribution name
PLUGIN_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "numpy", "tqdm", "pyyaml", "tokenizers")
PLUGIN_MODULES = ("runner", "hooks", "rows", "loss", "metrics", "teachers", "script", "smoke")
# LLaMA-Factory v0.9.2's requirements.txt (what DnD's requirements.txt installs), for the packages the
# plugin shares with it and peft; used when llamafactory itself is not installed here
LLAMAFACTORY_0_9_2 = (
    "transformers>=4.41.2,<=4.49.0,!=4.46.*,!=4.47.*,!=4.48.0",
    "accelerate>=0.34.0,<=1.2.1",
    "peft>=0.11.1,<=0.12.0",
    "tokenizers>=0.19.0,<=0.21.0",
    "numpy<2.0.0",
)


class EnvironmentCheckError(LLGBMError):
    """A file the environment check reads cannot be used."""


@dataclass
class PackageCheck:
    """One package: its installed version (None: not installed) and the ranges that apply to it."""

    name: str
    version: str | None
    needs: list[tuple[str, Requirement]] = field(default_factory=list)  # (who needs it, requirement)
    required: bool = False  # the plugin imports it

    def met(self, req: Requirement) -> bool:
        return self.version is not None and req.specifier.contains(Version(self.version), prereleases=True)

    @property
    def problems(self) -> list[str]:
        if self.version is None:
            return ["not installed"] if self.required else []
        return [f"{who} needs {req.specifier}" for who, req in self.needs if not self.met(req)]

    def line(self) -> str:
        """``ok|FAIL  name version: who range; ...``, each unmet range marked ``(not met)``."""
        ranges = "; ".join(f"{who} {req.specifier or 'any'}{'' if self.met(req) or not self.version else ' (not met)'}"
                           for who, req in self.needs)
        return f"{'FAIL' if self.problems else 'ok':4s}  {self.name} {self.version or '(not installed)'}: {ranges}"


def _requirements(lines, source: str) -> list[Requirement]:
    """Requirements of ``lines`` that apply here (markers true, no extras); pip options and URLs skipped."""
    found = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith(("-", "git+", "http://", "https://", "file:")):  # options, bare URLs
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise EnvironmentCheckError(f"{source}: cannot read requirement {text!r} ({e})") from None
        if req.url or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        found.append(req)
    return found


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_packages(dnd_root: str | os.PathLike | None = None) -> list[PackageCheck]:
    """One ``PackageCheck`` per package the plugin imports or DnD's stack pins among them and peft."""
    if installed("llgbm-ext") is None:
        raise EnvironmentCheckError("llgbm-ext is not installed in this environment (pip install --no-deps -e .)")
    checks: dict[str, PackageCheck] = {}

    def need(who: str, req: Requirement, required: bool = False) -> None:
        key = canonicalize_name(req.name)
        check = checks.setdefault(key, PackageCheck(key, installed(req.name)))
        check.needs.append((who, req))
        check.required |= required

    shared = {canonicalize_name(n) for n in PLUGIN_PACKAGES}
    for req in _requirements(metadata.requires("llgbm-ext") or [], "llgbm-ext metadata"):
        if canonicalize_name(req.name) in shared:
            need("llgbm_ext", req, required=True)
    stack = shared | {"peft"}
    if dnd_root is not None:
        path = Path(dnd_root) / "requirements.txt"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise EnvironmentCheckError(f"{path}: cannot read DnD's requirements ({e.strerror or e})") from None
        for req in _requirements(lines, str(path)):
            if canonicalize_name(req.name) in stack and req.specifier:
                need("DnD", req)
    factory = installed("llamafactory")
    lines = metadata.requires("llamafactory") if factory else LLAMAFACTORY_0_9_2
    for req in _requirements(lines or [], "llamafactory metadata"):
        if canonicalize_name(req.name) in stack:
            need(f"LLaMA-Factory {factory or '0.9.2'}", req)
    return list(checks.values())


def check_imports() -> list[str]:
    """Problems importing the plugin's modules (empty: they all import)."""
    problems = []
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(f"llgbm_ext.dnd.{module}")
        except Exception as e:  # noqa: BLE001  (any import failure is what this check reports)
            problems.append(f"llgbm_ext.dnd.{module}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return problems
