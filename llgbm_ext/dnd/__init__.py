"""The DnD plugin: hooks that make Drag-and-Drop LLMs' own training scripts train with
λw·L_weight + λd·L_delta, without editing any DnD file.

    python -m llgbm_ext.dnd.runner --config FILE.yaml SCRIPT.py     (started by `launch_multi.sh ... --llgbm`)

  config.py    DnDPluginConfig (λ, probes, base model, layout, cadence) from YAML
  hooks.py     the hook registry, PluginSession, installed_hooks()
  rows.py      dataset hook: which training checkpoint each batch row is (token fingerprints)
  loss.py      loss hook: captures the HyperConv prediction, adds the delta term
  teachers.py  teacher deltas from the DeltaCache, computed once on rank 0
  metrics.py   trainer hook: the loss terms in DnD's wandb / print log
  script.py    the layout a DnD script declares (tokenizer, token size), read before it runs
  runner.py    the entry point: checks the config against the script, installs the hooks, runs it unchanged
  smoke.py     data of the CPU smoke task (workspace_overrides/main/tasks/llgbm_smoke)
"""

from .config import DnDPluginConfig, load_plugin_config
from .hooks import HOOKS, DnDTargets, PluginSession, builtin_hooks, installed_hooks, register_hook

__all__ = [
    "HOOKS",
    "DnDPluginConfig",
    "DnDTargets",
    "PluginSession",
    "builtin_hooks",
    "installed_hooks",
    "load_plugin_config",
    "register_hook",
]
