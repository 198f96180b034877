"""llgbm_ext: behavioral (delta-activation) supervision for prompt-to-LoRA generators.

Folders, one concern each:
  lora/       LoRA layouts, DnD-exact token format, adapter files, criterion weights
  models/     base models: the embedded ``tiny`` model, ``smollm2-135m``, name resolution
  data/       task data (DnD format, offline real data, synthetic suite), prompt formats, teacher sets
  delta/      where Δ is computed: probes, batched functional LoRA, activations, deltas, the DeltaCache
  losses/     weight, delta, multitask and delta-guided losses
  generator/  text encoder and prompt-to-LoRA generators (HyperConv)
  eval/       accuracy, exact match and delta metrics
  cli/        the ``llgbm`` command, one module per subcommand
"""

__version__ = "0.1.0"
