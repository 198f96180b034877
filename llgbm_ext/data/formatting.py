"""How an Example becomes model text: the context, the training target and the scored candidates.

Teachers are trained on ``context + target`` and evaluated by scoring ``context + candidate`` for
every candidate, so both sides use this one module and one ``PromptFormat``.

Answer styles for multiple-choice and True/False tasks:
* ``"letter"`` — DnD's format: the target is ``"[B]"`` (``"[True]"``); candidates are the bracketed labels.
* ``"option"`` — the target is the option text itself, after the full prompt (options listed);
  candidates are the option texts, scored by mean per-token log-likelihood.
* ``"cloze"`` — as ``"option"``, but the context is the question alone, without the listed options
  (lm-eval-harness's cloze formulation). On small models this is what makes teachers learn the answers
  rather than the format (SmolLM2-135M: ARC-Easy 56.5% -> 73.5% in 90 steps with option text as target,
  where DnD's letter format stayed at or below the base model).
Exact-answer tasks always use the response (GSM8K: reasoning ending in ``#### <number>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import LLGBMError
from .records import Example

LETTERS = "ABCDEFGHIJ"


class FormatError(LLGBMError):
    """An example cannot be formatted (no choices for a multiple-choice style, no gold answer, ...)."""


@dataclass(frozen=True)
class PromptFormat:
    """Text format shared by teacher training and evaluation.

    Attributes:
        answer_style: "letter" (DnD's "[B]"), "option" (the option text) or "cloze" (the option text
            after the question alone).
        chat_template: wrap the prompt (and system prompt) in the tokenizer's chat template.
        use_system: include the record's system prompt (chat template only).
        separator: plain format only: the text between prompt and answer.
    """

    answer_style: Literal["letter", "option", "cloze"] = "option"
    chat_template: bool = False
    use_system: bool = False
    separator: str = "\nAnswer:"


def question(example: Example) -> str:
    """The prompt without its listed options (the lines from the first ``A: <first choice>`` on)."""
    if not example.choices:
        return example.prompt
    first = example.choices[0].strip()
    lines = example.prompt.split("\n")
    for i, line in enumerate(lines):
        label, _, text = line.partition(": ")
        if text.strip() == first and label.strip() in (LETTERS[0], "1", "(A)"):
            return "\n".join(lines[:i]).rstrip()
    cut = example.prompt.find(f"A: {first}")
    return example.prompt[:cut].rstrip() if cut > 0 else example.prompt


def context(example: Example, fmt: PromptFormat, tokenizer=None) -> str:
    """The text before the answer."""
    prompt = question(example) if fmt.answer_style == "cloze" else example.prompt
    if not fmt.chat_template:
        return prompt + fmt.separator
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise FormatError("chat_template=True needs a tokenizer with a chat template")
    messages = [{"role": "system", "content": example.system}] if fmt.use_system and example.system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _lead(fmt: PromptFormat) -> str:
    return "" if fmt.chat_template else " "


def candidates(example: Example, fmt: PromptFormat) -> list[str]:
    """The continuations scored for a multiple-choice or True/False example, in choice order."""
    if not example.choices:
        raise FormatError(f"example has no choices: {example.prompt[:60]!r}")
    lead = _lead(fmt)
    if fmt.answer_style in ("option", "cloze"):
        return [lead + choice for choice in example.choices]
    if len(example.choices) == 2 and tuple(example.choices) == ("True", "False"):
        return [lead + "[True]", lead + "[False]"]
    return [lead + f"[{LETTERS[i]}]" for i in range(len(example.choices))]


def target(example: Example, fmt: PromptFormat) -> str:
    """The gold continuation a teacher is trained on (without the end-of-sequence token)."""
    if example.choices:
        if not isinstance(example.answer, int):
            raise FormatError(f"multiple-choice example without a gold index: {example.prompt[:60]!r}")
        return candidates(example, fmt)[example.answer]
    if not example.response:
        raise FormatError(f"example without a response: {example.prompt[:60]!r}")
    return _lead(fmt) + example.response
