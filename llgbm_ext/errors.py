"""User-facing errors: one line naming the file, key or argument, printed by the CLI without a traceback."""


class LLGBMError(Exception):
    """Base class for errors caused by bad input (files, arguments, configs), not by bugs."""


class AdapterError(LLGBMError):
    """An adapter file or directory is unreadable or does not match the expected layout."""


class LayoutError(LLGBMError):
    """A LoRA layout is unknown or inconsistent."""


class ModelError(LLGBMError):
    """A base model cannot be resolved or loaded."""
