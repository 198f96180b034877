"""``llgbm dnd``: set up a DnD checkout for the plugin.

    llgbm dnd overlay --dnd-root DIR          lay workspace_overrides/ over DIR/workspace/
    llgbm dnd teachers --dnd-root DIR --config FILE.yaml [--script SCRIPT.py] FOLDER...
                                              fill the DeltaCache with the teacher targets of FOLDER/*.safetensors
    llgbm dnd check-env [--dnd-root DIR]      check this environment: the plugin's packages, DnD's pins, imports

``overlay`` copies the LLGBM configs, probe sets and the CPU smoke task into DnD's ``workspace/``
(``main/`` and ``llgbm/``; never the overrides' README), atomically per file; a different existing
file is an error unless ``--force``. ``teachers`` runs the precomputation the loss hook does on the
first delta step (every behaviour signal of the config: Δ, KL), ahead of training, so a multi-GPU run does not wait on it; run it with
the training's device kind (or an explicit ``dtype`` in the config): the dtype is part of the cache key.
Started by ``torchrun`` or ``accelerate launch``, its processes split the misses, as the training's do.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..atomic import atomic_path
from ..errors import LLGBMError

OVERLAY_PARTS = ("main", "llgbm")  # the subfolders of workspace_overrides/ laid over DnD's workspace/


class OverlayError(LLGBMError):
    """The overrides or the DnD checkout cannot be used for an overlay."""


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("dnd", parents=[common], help="set up a DnD checkout for the plugin (overlay, teacher deltas)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    o = actions.add_parser("overlay", parents=[common], help="lay workspace_overrides/ over DnD's workspace/")
    o.add_argument("--dnd-root", required=True, metavar="DIR", help="root of the DnD checkout (holds workspace/dnd)")
    o.add_argument("--source", metavar="DIR", help="the overrides folder (default: workspace_overrides/ of this checkout)")
    o.add_argument("--force", action="store_true", help="replace existing files that differ")
    o.set_defaults(func=run_overlay)

    t = actions.add_parser("teachers", parents=[common], help="precompute the signals' teacher targets into the DeltaCache")
    t.add_argument("--dnd-root", required=True, metavar="DIR", help="root of the DnD checkout (relative config paths)")
    t.add_argument("--config", metavar="FILE.yaml", help="the plugin config used for training")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key")
    t.add_argument("--script", metavar="SCRIPT.py", help="the DnD training script: the layout of its tokenizer "
                   "(layout: auto), or checked against the config's (default: layout auto = the base model's)")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: this process's GPU if any)")
    t.add_argument("folders", nargs="+", metavar="FOLDER", help="DnD checkpoint folders (<step>.safetensors files)")
    t.set_defaults(func=run_teachers)

    c = actions.add_parser("check-env", parents=[common],
                           help="check that this environment runs the plugin and still holds DnD's pinned stack")
    c.add_argument("--dnd-root", metavar="DIR", help="a DnD checkout: also check the pins of its requirements.txt")
    c.set_defaults(func=run_check_env)


def default_source() -> Path:
    return Path(__file__).resolve().parents[2] / "workspace_overrides"


def overlay(source: Path, dnd_root: Path, force: bool = False) -> list[Path]:
    """Copy ``source/{main,llgbm}/**`` into ``dnd_root/workspace/``; returns the files written."""
    if not (dnd_root / "workspace" / "dnd").is_dir():
        raise OverlayError(f"{dnd_root}: not a DnD checkout (no workspace/dnd)")
    files = sorted(f for part in OVERLAY_PARTS if (source / part).is_dir() for f in (source / part).rglob("*")
                   if f.is_file() and "__pycache__" not in f.parts)
    if not files:
        raise OverlayError(f"{source}: no overrides found under {', '.join(OVERLAY_PARTS)}/")
    targets = [dnd_root / "workspace" / f.relative_to(source) for f in files]
    clashes = [t for f, t in zip(files, targets) if t.exists() and t.read_bytes() != f.read_bytes()]
    if clashes and not force:
        raise OverlayError(f"{clashes[0]}: exists and differs from the override (use --force to replace)")
    written = []
    for file, target in zip(files, targets):
        if target.exists() and target.read_bytes() == file.read_bytes():
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(file, tmp)
        written.append(target)
    return written


def run_overlay(args) -> int:
    source = Path(args.source) if args.source else default_source()
    if not source.is_dir():
        raise OverlayError(f"{source}: no such overrides folder (pass --source; it ships with the source checkout)")
    written = overlay(source, Path(args.dnd_root), args.force)
    print(f"llgbm dnd overlay: {len(written)} file(s) written under {Path(args.dnd_root) / 'workspace'}")
    for path in written:
        print(f"  {path}")
    return 0


def run_teachers(args) -> int:
    import torch
    from accelerate import PartialState

    from ..dnd.config import load_plugin_config
    from ..dnd.loss import BehaviourTerm
    from ..dnd.script import resolve_layout
    from ..lora.adapters import list_adapters

    root = Path(args.dnd_root).resolve()
    config = resolve_layout(load_plugin_config(args.config, args.set), args.script, root, required=True)
    requested = None if args.device == "auto" else torch.device(args.device)
    state = PartialState(cpu=requested is not None and requested.type == "cpu")  # joins a torchrun launch's processes
    device = requested if requested is not None else state.device
    files = [str(path) for folder in args.folders for path in list_adapters(folder)]
    term = BehaviourTerm.build(config, root, files, device)
    count = len(term.teachers.index_of)
    if state.is_main_process:
        print(f"llgbm dnd teachers: targets of {', '.join(term.signals)} for {count} distinct teacher(s) of "
              f"{len(files)} file(s) in the DeltaCache")
    return 0


def run_check_env(args) -> int:
    import platform

    from ..dnd.environment import (
        PLUGIN_MODULES,
        check_imports,
        check_packages,
        installed,
    )

    checks = sorted(check_packages(args.dnd_root), key=lambda c: c.name)
    imports = check_imports()
    print(f"llgbm dnd check-env: python {platform.python_version()}, llgbm-ext {installed('llgbm-ext')}")
    for check in checks:
        print(f"  {check.line()}")
    print(f"  {'FAIL' if imports else 'ok':4s}  import llgbm_ext.dnd.{{{','.join(PLUGIN_MODULES)}}}")
    for problem in imports:
        print(f"        {problem}")
    count = sum(bool(c.problems) for c in checks) + len(imports)
    print(f"llgbm dnd check-env: {f'{count} problem(s)' if count else 'no problems'}")
    return 1 if count else 0
