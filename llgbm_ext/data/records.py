"""The task data model shared by every loader: an ``Example`` is one DnD-style record, a ``Task`` a data set.

DnD stores tasks as JSON arrays of ``{"prompt", "response", "system"}`` records. Multiple-choice
responses are ``"[B]"``, BoolQ responses ``"[True]"``/``"[False]"``, GSM8K responses end with
``"#### <number>"``. Where a loader knows more (the option texts, the gold index, the exact answer),
it fills ``choices`` and ``answer`` so that evaluation can score by option likelihood or exact match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["mc", "bool", "exact"]  # option-likelihood scoring, True/False, exact match


@dataclass(frozen=True)
class Example:
    """One record. ``answer``: gold index into ``choices`` (mc/bool), or the exact answer string (exact)."""

    prompt: str
    response: str
    system: str = ""
    choices: tuple[str, ...] | None = None
    answer: int | str | None = None

    def to_dnd(self) -> dict:
        """The DnD JSON record."""
        return {"prompt": self.prompt, "response": self.response, "system": self.system}


@dataclass
class Task:
    """A named data set with train/test splits and the unlabeled prompts that identify it (DnD's conditions)."""

    name: str
    kind: TaskKind
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)  # a data set's own validation split, if read
    conditions: list[str] = field(default_factory=list)
    family: str | None = None  # tasks of one family differ by a parameter (synthetic suite)
    licence: str | None = None
