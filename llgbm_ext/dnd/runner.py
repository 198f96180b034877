"""Run a DnD training script unchanged, with the llgbm_ext hooks installed.

    python -m llgbm_ext.dnd.runner [--config FILE.yaml] [--set KEY=VALUE ...] SCRIPT.py [SCRIPT ARGS ...]

This is what ``launch_multi.sh ... --llgbm`` (``patches/``) and ``scripts/launch_llgbm.sh`` start under
``accelerate launch``, once per process. It runs the script as Python would run it as a file: with
``runpy``, ``__name__ == "__main__"``, an absolute ``__file__``, ``sys.argv = [SCRIPT, ARGS...]`` and the
script's folder first on ``sys.path``; the hooks are installed first and removed afterwards. Before
anything of the script runs, the plugin config's layout is taken from the script (``layout: auto``) or
checked against it (``script.py``), and against the base model.

Two DnD launch requirements are met here, for runs through this entry point only:

* DnD's scripts find their repository root as the path component named ``Drag-and-Drop-LLMs`` in
  ``__file__`` and ``chdir`` there (contract §6.11). If the DnD checkout has another name (e.g. the
  ``dnd_repo`` submodule), the script is run through a symlink of that name in a private temporary
  folder, so ``__file__`` contains it and every relative path still reaches the real checkout.
  (``patches/fix-repo-root.patch`` removes the requirement from the scripts themselves.)
* DnD's scripts read ``os.environ["NUM_PROCESSES"]``, which only DnD's launchers set (contract §6.12);
  when it is missing it is set to the process count of the launch (``WORLD_SIZE``, else 1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..delta.probes import get_probe_set
from ..errors import LLGBMError
from ..lora.layout import get_layout, layout_from_config
from ..models.registry import resolve_base_model
from .config import DnDPluginConfig, load_plugin_config, under_root
from .hooks import PluginSession, installed_hooks
from .script import resolve_layout

ROOT_NAME = "Drag-and-Drop-LLMs"


class RunnerError(LLGBMError):
    """The script or the DnD checkout around it cannot be used."""


def find_dnd_root(script: Path) -> Path:
    """The nearest folder above ``script`` that holds DnD's package ``workspace/dnd``."""
    for folder in script.parents:
        if (folder / "workspace" / "dnd").is_dir():
            return folder
    raise RunnerError(f"{script}: not inside a DnD checkout (no parent folder holds workspace/dnd)")


@contextlib.contextmanager
def dnd_named_path(script: Path, root: Path) -> Iterator[Path]:
    """``script`` if its path names ``Drag-and-Drop-LLMs``; else the same file reached through a
    temporary symlink of that name to ``root`` (removed on exit)."""
    if ROOT_NAME in script.parts:
        yield script
        return
    holder = Path(tempfile.mkdtemp(prefix="llgbm-dnd-"))
    try:
        (holder / ROOT_NAME).symlink_to(root, target_is_directory=True)
        yield holder / ROOT_NAME / script.relative_to(root)
    finally:
        shutil.rmtree(holder, ignore_errors=True)  # removes the link, never what it points to


@contextlib.contextmanager
def script_process_state(script: Path, args: Sequence[str], root: Path) -> Iterator[None]:
    """``sys.argv``, ``sys.path`` and ``NUM_PROCESSES`` as the script expects them; restored on exit."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    set_num_processes = "NUM_PROCESSES" not in os.environ
    sys.argv = [str(script), *args]
    sys.path[:1] = [str(script.parent)]  # `python -m` put the working directory there
    sys.path.append(str(root))  # where `workspace.dnd` is imported from; the script appends it too
    if set_num_processes:
        os.environ["NUM_PROCESSES"] = os.environ.get("WORLD_SIZE", "1")
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if set_num_processes:
            os.environ.pop("NUM_PROCESSES", None)


def check_config(config: DnDPluginConfig, script: Path, root: Path) -> DnDPluginConfig:
    """``config`` with its layout resolved against the script (``script.resolve_layout``); fails before
    DnD's long set-up if the layout, base model or probe set cannot be found or disagree."""
    config = resolve_layout(config, script, root)
    if not config.uses_delta:
        return config
    layout = get_layout(under_root(config.layout, root))
    model_dir = resolve_base_model(under_root(config.base_model, root))
    base = layout_from_config(model_dir)
    geometry = ("num_layers", "hidden_size", "intermediate_size", "kv_size", "q_size")
    if any(getattr(base, g) != getattr(layout, g) for g in geometry):
        raise RunnerError(
            f"layout {layout.name!r} does not fit base model {model_dir}: "
            + ", ".join(f"{g} {getattr(layout, g)} vs {getattr(base, g)}" for g in geometry if getattr(base, g) != getattr(layout, g))
        )
    get_probe_set(under_root(config.probes, root))
    return config


def run_dnd_script(
    script: str | os.PathLike,
    args: Sequence[str] = (),
    config: DnDPluginConfig | None = None,
    *,
    hooks: bool = True,
) -> dict:
    """Run a DnD script as ``__main__`` with the hooks of ``config`` installed (none if ``hooks`` is
    False); returns the script's globals."""
    script = Path(os.path.abspath(script))
    if not script.is_file():
        raise RunnerError(f"{script}: no such script")
    root = find_dnd_root(script)
    config = config if config is not None else DnDPluginConfig()
    if hooks:
        config = check_config(config, script, root)
    with dnd_named_path(script, root) as path:
        named_root = path.parents[len(script.relative_to(root).parts) - 1]
        with script_process_state(path, args, named_root):
            if not hooks:
                return runpy.run_path(str(path), run_name="__main__")
            with installed_hooks(PluginSession(config, named_root)):
                return runpy.run_path(str(path), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llgbm_ext.dnd.runner",
        description="Run a DnD training script unchanged, training with λw·L_weight + λd·L_delta.",
    )
    parser.add_argument("--config", "--llgbm-config", dest="config", metavar="FILE.yaml", help="plugin config (llgbm_ext.dnd.config); default: built-in defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--no-hooks", action="store_true", help="run the script through the runner without any hook")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of llgbm_ext errors")
    parser.add_argument("script", help="the DnD script, e.g. tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_plugin_config(args.config, args.set)
        run_dnd_script(args.script, args.args, config, hooks=not args.no_hooks)
    except LLGBMError as e:
        if args.debug:
            raise
        sys.stderr.write(f"llgbm_ext.dnd.runner: error: {e}\n")  # one write: ranks share stderr
        sys.stderr.flush()
        from ..signals.base import settle

        settle(e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
