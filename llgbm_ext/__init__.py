"""llgbm_ext: behavioral (delta-activation) supervision for prompt-to-LoRA generators.

Folders, one concern each:
  lora/    LoRA layouts, DnD-exact token format, adapter files
  models/  base models: the embedded ``tiny`` model and name resolution
  cli/     the ``llgbm`` command
"""

__version__ = "0.1.0"
