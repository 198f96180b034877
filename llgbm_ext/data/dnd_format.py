"""DnD's task files (``prepare/data/*.json``) read into ``Task`` / ``Example`` objects, and written back.

A task file is a JSON array (DnD writes ``indent=4``) or a JSONL file of records
``{"prompt": str, "response": str, "system": str}``. The answer formats are:

  * multiple choice (ARC-e, ARC-c, OBQA, PIQA, HellaSwag, WinoGrande): the prompt ends with one option
    per line, ``question\\nA: text\\nB: text``, and the response is the gold label in brackets, ``"[B]"``.
    ARC has a few items labelled ``1: … 4:`` (response ``"[2]"``); HellaSwag glues the first option to
    the sentence (``…Choices:A: text\\nB: text``); OBQA and WinoGrande may end with a line
    ``Please answer the question choosing from …``;
  * BoolQ: the prompt is the question, the response ``"[True]"`` or ``"[False]"``;
  * GSM8K: free text whose response ends with ``#### <number>``.

Task names as LLGBM users type them (``arc_e``) map to DnD's file names (``ARC-e_train.json``).
DnD's LLaMA-Factory registry reads the test split of BoolQ, HellaSwag and WinoGrande from
``<Name>_validation.json`` (its ``WinoGrande_test.json`` has no answers), and GSM8K's test split is
``GSM8K.json``; ``split_paths`` follows the same rules.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..errors import LLGBMError
from .records import Example, Task, TaskKind

BOOL_CHOICES = ("True", "False")
SPLITS = ("train", "test")  # what load_task reads by default; "validation" is read where it is asked for


class DataError(LLGBMError):
    """A task file or task name is unusable; the message names the file and the record."""


@dataclass(frozen=True)
class TaskSpec:
    """How one DnD task is stored: its LLGBM name, DnD file stem, answer kind and data licence."""

    name: str  # as LLGBM users type it, e.g. "arc_e"
    dnd_name: str  # DnD's file stem, e.g. "ARC-e"
    kind: TaskKind
    test_file: str  # DnD's file stem of the split that is scored
    licence: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_e", "ARC-e", "mc", "ARC-e_test", "CC-BY-SA-4.0"),
        TaskSpec("arc_c", "ARC-c", "mc", "ARC-c_test", "CC-BY-SA-4.0"),
        TaskSpec("boolq", "BoolQ", "bool", "BoolQ_validation", "CC-BY-SA-3.0"),
        TaskSpec("gsm8k", "GSM8K", "exact", "GSM8K", "MIT"),
        TaskSpec("hellaswag", "HellaSwag", "mc", "HellaSwag_validation", "MIT"),
        TaskSpec("obqa", "OBQA", "mc", "OBQA_test", "Apache-2.0"),
        TaskSpec("piqa", "PIQA", "mc", "PIQA_test", "AFL-3.0"),
        TaskSpec("winogrande", "WinoGrande", "mc", "WinoGrande_validation", "CC-BY"),
    )
}


# DnD's system prompts, typos included (its models were trained with exactly these strings).
_ASSISTANT = "you are a helpful AI assistant, and you are going to "
_FORMAT = " You'll only need to answer by a single [ans] (ans is A,B,C,D or True/False)"
SYSTEM_PROMPTS: dict[str, str] = {
    "mc": _ASSISTANT + "answer the question of the user by picking one answer among the given choices. "
    "Answer the chapital character of the choice directly." + _FORMAT,
    "bool": _ASSISTANT + "answer the question of the user by determining the statement is true or false. "
    "Answer true or false directly." + _FORMAT,
    "winogrande": _ASSISTANT + "answer the question of the user by picking one answer among the given 2 choices. "
    "Answer the chapital character of the choice directly." + _FORMAT,
    "piqa": _ASSISTANT + "find the better solution to a specific problem from the given 2 solutions. "
    "Answer the chapital character of the better solution directly." + _FORMAT,
    "hellaswag": _ASSISTANT + "finsh the sentence by picking one sentence from the given choices. "
    "Answer the chapital character of the choice directly. Answer true or false directly." + _FORMAT,
    "exact": "",  # DnD's GSM8K records carry no system prompt
}


def system_prompt(spec: TaskSpec) -> str:
    """DnD's system prompt for a task (WinoGrande, PIQA and HellaSwag have their own variants)."""
    return SYSTEM_PROMPTS.get(spec.name, SYSTEM_PROMPTS[spec.kind])


def task_spec(name: str) -> TaskSpec:
    """The spec of a task by LLGBM name (``arc_e``) or DnD name (``ARC-e``), case-insensitive."""
    key = name.strip().lower()
    for spec in TASKS.values():
        if key in (spec.name, spec.dnd_name.lower()):
            return spec
    raise DataError(f"unknown task {name!r}: use one of {', '.join(TASKS)} (or DnD's names, e.g. ARC-e)")


def split_paths(data_dir: str | os.PathLike, spec: TaskSpec, split: str) -> list[Path]:
    """Candidate files of one split, preferred first (``.json`` before ``.jsonl``).

    ``validation`` is a data set's own validation split apart from its test split (``ARC-e_validation``);
    tasks whose test split is their validation split (BoolQ, PIQA, ...) have none: no candidates."""
    if split == "train":
        stems = [f"{spec.dnd_name}_train"]
    elif split == "test":
        stems = list(dict.fromkeys([spec.test_file, f"{spec.dnd_name}_test"]))
    elif split == "validation":
        stems = [] if spec.test_file == f"{spec.dnd_name}_validation" else [f"{spec.dnd_name}_validation"]
    else:
        raise DataError(f"unknown split {split!r}: use one of train, test, validation")
    return [Path(data_dir) / f"{stem}{ext}" for stem in stems for ext in (".json", ".jsonl")]


# --- reading records ------------------------------------------------------------------------------
def _check_record(path: Path, where: str, record, require_response: bool) -> dict:
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DataError(f"{path}: {where}: expected an object with 'prompt' and 'response', got {kind}")
    required = ("prompt", "response") if require_response else ("prompt",)
    for key in required:
        if key not in record:
            raise DataError(f"{path}: {where}: missing {key!r}")
    for key in ("prompt", "response", "system"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{path}: {where}: {key!r} must be a string, got {type(record[key]).__name__}")
    return record


def read_records(path: str | os.PathLike, require_response: bool = True) -> list[dict]:
    """Validated records of a JSON-array or JSONL (``*.jsonl``) task file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl task file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"line {lineno} (record {len(records)})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: {where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(_check_record(path, where, record, require_response))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no records")
    return [_check_record(path, f"record {i}", record, require_response) for i, record in enumerate(data)]


# --- answers ----------------------------------------------------------------------------------------
# Lines DnD appends after the options. Its OBQA test split also appends "." to the last option.
INSTRUCTION_OBQA_TRAIN = "\nPlease answer the question choosing from A/B/C/D."
INSTRUCTION_BRACKETED = "\nPlease answer the question choosing from [A]/[B]/[C]/[D]."  # WinoGrande validation/test
INSTRUCTION_OBQA_TEST = "." + INSTRUCTION_BRACKETED
_INSTRUCTION = re.compile(r"\n\s*Please answer the question choosing from[^\n]*\s*$")
_OPTION = re.compile(r"(?:^|\n|Choices:)([A-Z]|[1-9]): ")
_BRACKETED = re.compile(r"^\s*\[?\s*([^\[\]\s]+)\s*\]?\s*$")


def _next_label(label: str) -> str:
    return str(int(label) + 1) if label.isdigit() else chr(ord(label) + 1)


def parse_options(prompt: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(labels, option texts) of the option block that ends a multiple-choice prompt, or None.

    The block is the first run of ``A: … B: …`` (or ``1: … 2: …``) labels, in order, that reaches the
    end of the prompt; a trailing ``Please answer the question choosing from …`` line is ignored (with
    the ``.`` that DnD's OBQA test split adds before it).
    """
    for trailer in (INSTRUCTION_OBQA_TEST, INSTRUCTION_BRACKETED, INSTRUCTION_OBQA_TRAIN):
        if prompt.endswith(trailer):
            body = prompt.removesuffix(trailer)
            break
    else:
        body = _INSTRUCTION.sub("", prompt)
    matches = list(_OPTION.finditer(body))
    for first, match in enumerate(matches):
        if match.group(1) not in ("A", "1"):
            continue
        block = matches[first:]
        labels = [m.group(1) for m in block]
        if len(labels) >= 2 and all(b == _next_label(a) for a, b in zip(labels, labels[1:])):
            ends = [m.start() for m in block[1:]] + [len(body)]
            texts = tuple(body[m.end() : end].strip() for m, end in zip(block, ends))
            return tuple(labels), texts
    return None


def response_label(response: str) -> str | None:
    """The label inside a bracketed response (``"[B]"`` -> ``"B"``, ``"[True]"`` -> ``"True"``)."""
    match = _BRACKETED.match(response)
    return match.group(1) if match else None


def exact_answer(response: str) -> str | None:
    """GSM8K's final answer: the text after the last ``####``, without thousands separators."""
    if "####" not in response:
        return None
    answer = response.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


def to_example(record: dict, kind: TaskKind) -> Example:
    """An Example with ``choices`` and ``answer`` filled in where the prompt and response allow."""
    prompt, response = record["prompt"], record.get("response", "")
    choices, answer = None, None
    if kind == "mc":
        parsed = parse_options(prompt)
        if parsed is not None:
            labels, choices = parsed
            label = response_label(response)
            answer = labels.index(label) if label in labels else None
    elif kind == "bool":
        choices = BOOL_CHOICES
        label = (response_label(response) or "").capitalize()
        answer = BOOL_CHOICES.index(label) if label in BOOL_CHOICES else None
    else:
        answer = exact_answer(response)
    return Example(prompt=prompt, response=response, system=record.get("system", ""), choices=choices, answer=answer)


def read_examples(path: str | os.PathLike, kind: TaskKind, require_response: bool = True) -> list[Example]:
    """Examples of one task file."""
    return [to_example(record, kind) for record in read_records(path, require_response)]


def write_examples(path: str | os.PathLike, examples: list[Example]) -> None:
    """Atomically write a DnD task file, laid out as DnD writes them (JSON array, ``indent=4``, UTF-8 as is,
    no final newline; an empty system prompt is left out, as in DnD's GSM8K.json)."""
    records = [example.to_dnd() for example in examples]
    for record in records:
        if not record["system"]:
            del record["system"]
    write_text(path, json.dumps(records, indent=4, ensure_ascii=False))


def load_task(data_dir: str | os.PathLike, name: str, splits: tuple[str, ...] = SPLITS) -> Task:
    """Load a task from a directory of DnD task files; ``conditions`` are the training prompts.

    Every split asked for must exist (GSM8K has no training file on PyPI: pass ``splits=("test",)``).
    """
    spec = task_spec(name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory")
    task = Task(name=spec.name, kind=spec.kind, licence=spec.licence)
    for split in splits:
        candidates = split_paths(data_dir, spec, split)
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            names = ", ".join(p.name for p in candidates)
            raise DataError(f"{data_dir}: task {spec.name} has no {split} file (looked for {names})")
        setattr(task, split, read_examples(path, spec.kind))
    task.conditions = [example.prompt for example in task.train]
    return task
