"""lm-evaluation-harness as a second scorer: our tasks as lm-eval task configs, scored by its HF model.

Each task becomes ``llgbm_<task>.yaml`` and ``llgbm_<task>.jsonl`` (tag ``llgbm``): one JSON line per
usable test example, holding the text ``llgbm_ext.data.formatting`` gives it, so lm-eval scores
exactly the continuations our scorer scores.

* Multiple choice and True/False (``output_type: multiple_choice``): ``context`` is the text before
  the answer, ``choices`` the candidates without their leading space, which is the task's
  ``target_delimiter`` (``" "``; ``""`` with a chat template), ``gold`` the answer's index. lm-eval's
  ``acc`` picks the option of highest summed log-likelihood (our ``--reduction sum``), ``acc_norm``
  the highest sum divided by the option's length in characters, ``acc_bytes`` in UTF-8 bytes. Our
  ``mean`` divides by the option's number of tokens, which lm-eval has no metric for: the backend
  computes it from lm-eval's summed log-likelihoods and its own split of the continuation tokens.
* Exact answers (``output_type: generate_until``): greedy decoding, stopping at a newline for
  short answers; ``answer`` is the gold answer. lm-eval's ``exact_match`` compares strings (ends
  stripped; GSM8K style: the number after ``####``, commas ignored); the backend scores lm-eval's
  raw generations with our own answer extraction and matching (``scoring.extract_answer``).

lm-eval tokenizes ``context + continuation`` as one string and scores the tokens past the context's
own; we tokenize the two separately. Both give the same tokens wherever the pre-tokenizer splits
before the option's space (byte-level BPE as in ``tiny`` and SmolLM2: checked on ARC-Easy). With a chat
template lm-eval also moves the context's trailing newline into the continuation, which adds that
newline's log-probability, the same for every option, to each option's score.

The JSONL files are named in the YAML by absolute path (``datasets``' JSON loader reads no path
relative to the config): export again after moving the folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..atomic import write_text
from ..data.formatting import PromptFormat, candidates, context
from ..data.records import Task
from ..errors import LLGBMError
from .scoring import (
    ExampleResult,
    TaskResult,
    answer_style,
    answers_match,
    extract_answer,
)

TAG = "llgbm"
REQUIREMENT = "lm-eval>=0.4.13,<0.5"
MC_METRICS = ("acc", "acc_norm", "acc_bytes")
GSM8K_PATTERN = r"#### (\-?[0-9\.\,]+)"  # lm-eval's own GSM8K answer filter


class HarnessError(LLGBMError):
    """lm-evaluation-harness is missing, or a task cannot be written for it."""


@dataclass(frozen=True)
class HarnessTask:
    """One task written for lm-eval: its name there, its files and the examples left out."""

    task: Task
    name: str  # lm-eval task name, llgbm_<task>
    config: Path
    documents: int
    skipped: int  # examples without a gold answer (or options), as our scorer skips them


@dataclass(frozen=True)
class HarnessModel:
    """A model for lm-eval's HF backend: the base model, or the base with a PEFT adapter directory."""

    label: str
    adapter: Path | None = None


def harness_name(task: str) -> str:
    return f"{TAG}_{task}"


def import_lm_eval():
    """The ``lm_eval`` module, offline (no hub or data-set look-ups), or a one-line error naming the extra."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError:
        raise HarnessError(
            f"--backend lm-eval needs lm-evaluation-harness: pip install -e '.[harness]' (or '{REQUIREMENT}')"
        ) from None
    return lm_eval


# --- task files ------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Strings with a newline in double quotes (``"\\n"``), not YAML's folded multi-line form."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style='"' if "\n" in text else None))


def target_delimiter(fmt: PromptFormat) -> str:
    """The text between context and option that lm-eval adds itself: the candidates' leading space."""
    return "" if fmt.chat_template else " "


def max_new_tokens(task: Task, requested: int | None = None) -> int:
    """The greedy budget of ``llgbm eval``: ``requested``, else 256 for GSM8K-style tasks and 32 otherwise."""
    return requested or (256 if answer_style(task) == "gsm8k" else 32)


def task_documents(task: Task, fmt: PromptFormat, tokenizer=None, limit: int | None = None) -> tuple[list[dict], int]:
    """(documents, skipped): the first ``limit`` test examples that our scorer scores, in our answer
    format; ``index`` is the example's position in the test split."""
    examples = task.test[:limit] if limit is not None else task.test
    if not examples:
        raise HarnessError(f"task {task.name}: no test examples")
    delimiter = target_delimiter(fmt)
    documents = []
    for i, example in enumerate(examples):
        if task.kind == "exact":
            if isinstance(example.answer, str) and example.answer.strip():
                documents.append({"index": i, "context": context(example, fmt, tokenizer), "answer": example.answer})
            continue
        if not (example.choices and isinstance(example.answer, int)):
            continue
        options = candidates(example, fmt)
        if not all(o.startswith(delimiter) for o in options):
            raise HarnessError(f"task {task.name}: example {i}: an option does not start with {delimiter!r}")
        documents.append({"index": i, "context": context(example, fmt, tokenizer),
                          "choices": [o[len(delimiter):] for o in options], "gold": example.answer})
    return documents, len(examples) - len(documents)


def task_config(task: Task, data_file: Path, fmt: PromptFormat, new_tokens: int) -> dict:
    """The lm-eval task config (a YAML mapping) of ``task`` over its JSONL file."""
    config = {
        "task": harness_name(task.name),
        "tag": [TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "doc_to_text": "context",
    }
    if task.kind == "exact":
        gsm8k = answer_style(task) == "gsm8k"
        config.update({
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": [] if gsm8k else ["\n"], "do_sample": False, "max_gen_toks": new_tokens},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "regexes_to_ignore": [",", r"^\s+", r"\s+$"] if gsm8k else [r"^\s+", r"\s+$"]}],
        })
        if gsm8k:
            config["filter_list"] = [{"name": "answer", "filter": [
                {"function": "regex", "regex_pattern": GSM8K_PATTERN}, {"function": "take_first"}]}]
    else:
        config.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "target_delimiter": target_delimiter(fmt),
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in MC_METRICS],
        })
    config["metadata"] = {"version": 1.0, "answer_style": fmt.answer_style, "chat_template": fmt.chat_template,
                          "use_system": fmt.use_system}
    return config


def write_tasks(
    tasks: Sequence[Task], out_dir: str | os.PathLike, fmt: PromptFormat, tokenizer=None,
    limit: int | None = None, new_tokens: int | None = None,
) -> list[HarnessTask]:
    """Write ``llgbm_<task>.jsonl`` and ``.yaml`` per task into ``out_dir`` (each file atomically)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HarnessError(f"{out_dir}: exists and is not a directory")
    written = []
    for task in tasks:
        documents, skipped = task_documents(task, fmt, tokenizer, limit)
        if not documents:
            raise HarnessError(f"task {task.name}: no test example has a gold answer")
        data_file = out_dir / f"{harness_name(task.name)}.jsonl"
        config_file = out_dir / f"{harness_name(task.name)}.yaml"
        write_text(data_file, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
        config = task_config(task, data_file, fmt, max_new_tokens(task, new_tokens))
        write_text(config_file, yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True))
        written.append(HarnessTask(task, harness_name(task.name), config_file, len(documents), skipped))
    return written


# --- scoring -----------------------------------------------------------------------------------------
def _choice_result(sample: dict, lm, reduction: str) -> ExampleResult:
    """Prediction from lm-eval's per-option log-likelihoods: their sum, or their mean over the
    continuation tokens as lm-eval split them."""
    sums = np.array([float(ll) for ll, _ in sample["filtered_resps"]])
    if reduction == "mean":
        counts = np.array([len(lm._encode_pair(ctx, continuation)[1]) for ctx, continuation in sample["arguments"]])
        scores = sums / counts
    else:
        scores = sums
    gold, prediction = int(sample["doc"]["gold"]), int(np.argmax(scores))  # first of equal maxima, as ours
    return ExampleResult(int(sample["doc"]["index"]), gold, prediction, prediction == gold, scores=scores.tolist())


def _exact_result(sample: dict, task: Task) -> ExampleResult:
    """Our answer extraction and matching on lm-eval's raw generation."""
    text = sample["resps"][0][0]
    answer = extract_answer(text, answer_style(task))
    gold = sample["doc"]["answer"]
    return ExampleResult(int(sample["doc"]["index"]), gold, answer, answers_match(answer, gold), output=text)


def _metrics(found: dict) -> dict[str, float]:
    """lm-eval's own aggregate metrics of one task (``acc``, ``acc_norm``, ``exact_match`` ...)."""
    names = (*MC_METRICS, "exact_match")
    return {key.split(",")[0]: float(value) for key, value in found.items()
            if key.split(",")[0] in names and isinstance(value, (int, float))}


def evaluate_models(
    model_dir: str | os.PathLike,
    models: Sequence[HarnessModel],
    tasks: Sequence[HarnessTask],
    tasks_dir: str | os.PathLike,
    reduction: str = "mean",
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 64,
) -> tuple[list[TaskResult], dict, dict]:
    """Every task for every model through lm-eval's ``HFLM`` (``peft=`` the adapter directory), one
    model loaded at a time. Returns (results, lm-eval's metrics as model -> task -> name -> value, timing)."""
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if reduction not in ("mean", "sum"):
        raise HarnessError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    results, metrics, clock = [], {}, {"base": [0.0, 0], "adapters": [0.0, 0]}
    for model in models:
        start = time.perf_counter()
        lm = HFLM(pretrained=str(model_dir), peft=str(model.adapter) if model.adapter else None,
                  device=device, dtype=dtype, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[t.name for t in tasks], task_manager=manager,
                                      log_samples=True, bootstrap_iters=0)
        metrics[model.label] = {}
        for t in tasks:
            samples = sorted(out["samples"][t.name], key=lambda s: s["doc"]["index"])
            rows = [_exact_result(s, t.task) if t.task.kind == "exact" else _choice_result(s, lm, reduction)
                    for s in samples]
            results.append(TaskResult(t.task.name, t.task.kind, model.label, sum(r.correct for r in rows), len(rows),
                                      t.skipped, rows))
            metrics[model.label][t.task.name] = _metrics(out["results"][t.name])
        kind = "adapters" if model.adapter else "base"
        clock[kind][0] += time.perf_counter() - start
        clock[kind][1] += sum(t.documents for t in tasks)
        del lm
    timing = {kind: {"seconds": round(s, 3), "examples": n, "examples_per_s": round(n / s, 2) if s else None}
              for kind, (s, n) in clock.items() if n}
    return results, metrics, timing


def peft_directory(path: Path, layout, out_dir: Path, base_model: str) -> Path:
    """``path`` if it is a PEFT adapter directory; a DnD flat ``<step>.safetensors`` file (no config:
    DnD's alpha = 2·r, the layout's) is written to ``out_dir`` as one, for ``HFLM(peft=...)``."""
    from ..lora.adapters import load_adapter, save_peft_adapter

    if path.is_dir():
        return path
    return save_peft_adapter(load_adapter(path, layout).state_dict, out_dir, layout, base_model_name_or_path=base_model)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")
