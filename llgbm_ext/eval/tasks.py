"""A task by name with its test split, for scoring: the synthetic suite's, or a DnD-format file in a folder."""

from __future__ import annotations

from ..data.records import Task
from ..errors import LLGBMError


def task_with_test_split(name: str, data_dir: str | None, argument: str = "data_dir") -> Task:
    """The synthetic task ``name``, or ``name``'s test file in ``data_dir``; ``argument`` names where the
    folder is set, for the error when it is missing."""
    from ..data.synthetic import TASK_FAMILIES, get_synthetic_task

    if name in TASK_FAMILIES:
        return get_synthetic_task(name)
    if data_dir is None:
        raise LLGBMError(f"task {name!r} is not synthetic: give {argument} (DnD-format task files)")
    from ..data.dnd_format import load_task

    return load_task(data_dir, name, splits=("test",))
