"""``llgbm eval``: accuracy of a base model and of LoRA adapters on tasks, plus their delta behaviour.

The base model is always evaluated (the control every adapter is compared with). Adapters (``--adapters``
for trained ones, ``--generated`` for a generator's output) may be PEFT directories, DnD flat
``<step>.safetensors`` files, or folders of either; they are grouped by geometry (rank and targets)
and applied K at a time (``--adapters-per-forward``) to the one loaded base model through
``FunctionalLoRA``, so nothing is ever injected into it. Every adapter is evaluated on every task.
Rank and targets come from the weights; the LoRA scaling from ``adapter_config.json`` (alpha / r),
and for DnD flat files, which have no config, DnD's alpha = 2·r.

An adapter's task, used to mark its own task in the tables and for delta specificity, is taken from
``prompts.json`` or ``manifest.json`` in its PEFT directory (or in the folder holding a flat file) when
that file is a JSON object with a ``"task"`` key; ``"generated": true`` there marks a generated
adapter. Otherwise it is the adapter's own name (PEFT directory name or file stem), else its folder's
name, matched against the evaluated tasks case-insensitively with ``-`` read as ``_``: an exact match,
or the longest task name followed by ``_`` or ``.`` (``kind_3_seed1`` -> ``add_3``; ``kind_30`` is
not ``kind_3``); DnD's folder names (``ARC-e``) thus give ``arc_e``.

``--probes SET`` also computes every adapter's Δ on the probe set: with generated adapters and
trained adapters of at least two tasks it reports cosine, specificity and top-1 of each generated Δ
against the trained ones; otherwise the cosines between the trained adapters' task-mean Δ.

Writes ``results.json`` (config, every result with per-example predictions, delta behaviour, notes,
timing), ``report.md`` and ``accuracy.png`` / ``delta_cosines.png`` into ``--out``, and prints the
summary table.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..data.adapter_tasks import adapter_task
from ..errors import AdapterError, LLGBMError
from .arguments import positive_int

_PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|up_proj|gate_proj|down_proj)\.lora_A\.")


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval", parents=[common], help="accuracy of a base model and LoRA adapters on tasks (+ delta behaviour)")
    p.add_argument("--base-model", required=True, help="'tiny', a local model directory, or a cached hub id")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="tasks to evaluate (their test split)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", metavar="DIR", help="directory of DnD task files (<Name>_test.json ...)")
    source.add_argument("--synthetic", action="store_true", help="tasks of the embedded synthetic suite (kind_3, category_food ...)")
    p.add_argument("--adapters", nargs="+", default=[], metavar="PATH",
                   help="trained adapters: PEFT directories, DnD <step>.safetensors files, or folders of them")
    p.add_argument("--generated", nargs="+", default=[], metavar="PATH", help="generated adapters (same forms)")
    p.add_argument("--format", choices=["option", "cloze", "letter"], default="option",
                   help="answer style teachers were trained with: option text (default) or DnD's [B]")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--use-system", action="store_true", help="include the records' system prompts (chat template only)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="score only the first N test examples of each task")
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean", help="option score: mean (default) or summed log-prob")
    p.add_argument("--backend", choices=["builtin", "lm-eval"], default="builtin",
                   help="scorer: built-in (default; adapters K at a time) or lm-evaluation-harness (extra [harness]; "
                        "its HF model with each PEFT adapter, one at a time, --max-rows as batch size)")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="greedy budget (default 32; 256 for GSM8K-style tasks)")
    p.add_argument("--probes", metavar="SET", help="also compare adapters' deltas on this probe set (generic, domain:math, a JSON file)")
    p.add_argument("--reference", choices=["task_mean", "per_adapter"], default="task_mean",
                   help="teacher side of delta specificity: task-mean delta (default) or each teacher")
    p.add_argument("--adapters-per-forward", type=positive_int, default=8, metavar="K", help="adapters batched in one forward (default 8)")
    p.add_argument("--max-rows", type=positive_int, default=64, metavar="N", help="sequences per forward, all adapters together (default 64)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base model dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default="eval_results", metavar="DIR", help="output directory (default ./eval_results)")
    p.add_argument("--per-model", action="store_true", help="also print the per-model table (always in report.md)")
    p.add_argument("--no-examples", action="store_true", help="leave the per-example predictions out of results.json")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# --- adapters: files, geometry, task ---------------------------------------------------------------
@dataclass(frozen=True)
class AdapterEntry:
    """One adapter file to evaluate, with what the report needs to know about it."""

    path: Path
    label: str
    role: str  # "adapter" | "generated"
    task: str | None
    rank: int
    targets: tuple[str, ...]


def adapter_geometry(path: Path) -> tuple[int, tuple[str, ...]]:
    """(rank, target projections) read from the safetensors header, without loading the tensors."""
    from safetensors import safe_open

    from ..lora.adapters import WEIGHTS_NAME
    from ..lora.layout import PROJECTIONS

    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise AdapterError(f"{path}: missing {WEIGHTS_NAME} (not a PEFT adapter directory)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError with a short reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{weights}: not a readable safetensors file ({reason})") from None
    found = {m.group(1): shape for k, shape in shapes.items() if (m := _PROJECTION.search(k))}
    if not found:
        raise AdapterError(f"{weights}: no LoRA weights (no '*_proj.lora_A.*' keys)")
    return int(next(iter(found.values()))[0]), tuple(p for p in PROJECTIONS if p in found)


def collect_adapters(adapters: list[str], generated: list[str], tasks: list[str]) -> list[AdapterEntry]:
    """Expand the adapter arguments into entries. Labels are the PEFT directory name (the folder and
    the step for flat files); names that repeat get their folder in front, then a ``#n``."""
    from ..lora.adapters import list_adapters

    found = [(role, path) for role, arguments in (("adapter", adapters), ("generated", generated))
             for argument in arguments for path in list_adapters(argument)]
    names = [path.name if path.is_dir() else f"{path.parent.name}/{path.stem}" for _, path in found]
    repeated = {n for n in names if names.count(n) > 1}
    entries, seen = [], set()
    for (role, path), name in zip(found, names):
        label = f"{path.parent.name}/{name}" if name in repeated and path.is_dir() else name
        base, n = label, 1
        while label in seen:
            n += 1
            label = f"{base}#{n}"
        seen.add(label)
        task, marked = adapter_task(path, tasks)
        rank, targets = adapter_geometry(path)
        entries.append(AdapterEntry(path, label, "generated" if marked else role, task, rank, targets))
    return entries


# --- the run -------------------------------------------------------------------------------------
def _load_tasks(args) -> list:
    if args.synthetic:
        from ..data.synthetic import get_synthetic_task

        return [get_synthetic_task(name) for name in args.tasks]
    from ..data.dnd_format import load_task

    return [load_task(args.data_dir, name, splits=("test",)) for name in args.tasks]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LLGBMError(f"--device {name}: CUDA is not available")
    return name


def run(args) -> int:
    from ..atomic import write_text
    from ..eval.report import ModelInfo, accuracy_markdown, plot_accuracy, results_payload, write_json

    tasks = _load_tasks(args)
    task_names = [t.name for t in tasks]
    entries = collect_adapters(args.adapters, args.generated, task_names)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LLGBMError(f"--out {out}: exists and is not a directory")
    models = [ModelInfo("base", "base")] + [ModelInfo(e.label, e.role, e.task, str(e.path)) for e in entries]
    behaviour, behaviour_text, cosine_plot, harness = None, "", None, None
    if args.backend == "lm-eval":
        results, timing, device, harness = _evaluate_harness(args, tasks, entries, out)
    else:
        results, timing, device, (behaviour, behaviour_text, cosine_plot) = _evaluate_builtin(args, tasks, entries)
    notes = _notes(args, entries)

    run_config = {
        "base_model": args.base_model, "tasks": task_names, "source": "synthetic" if args.synthetic else str(args.data_dir),
        "backend": args.backend,
        "format": args.format, "chat_template": args.chat_template, "use_system": args.use_system,
        "reduction": args.reduction, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
        "probes": args.probes, "reference": args.reference, "dtype": args.dtype, "device": device,
        "adapters_per_forward": args.adapters_per_forward, "max_rows": args.max_rows,
    }
    task_info = [{"name": t.name, "kind": t.kind, "examples": len(t.test[: args.limit] if args.limit else t.test)} for t in tasks]
    payload = results_payload(run_config, models, results, task_info, behaviour, notes, timing, not args.no_examples)
    if harness is not None:
        payload["harness"] = harness
    write_json(out / "results.json", payload)
    summary = accuracy_markdown(models, results)
    scorer = (f"lm-evaluation-harness {harness['lm_eval_version']} (HF model, PEFT adapters; task configs in "
              f"`{harness['tasks_dir']}`)" if harness else "the built-in scorer")
    sections = [
        "# Evaluation", "",
        (f"Base model `{args.base_model}`; {len(entries)} adapter(s); answer style `{args.format}`"
         f"{' with chat template' if args.chat_template else ''}; scored by {scorer}; options by {args.reduction} "
         f"log-likelihood; exact answers by greedy decoding. Accuracy in %; an adapter group's own task in bold."), "",
        "## Accuracy by model group", "", summary, "",
        "## Accuracy per model", "", accuracy_markdown(models, results, per_model=True), "",
    ]
    if harness is not None:
        sections += ["## lm-eval's own metrics", "", _harness_markdown(harness["metrics"]), ""]
    if behaviour is not None:
        sections += [f"## Delta behaviour (probes `{args.probes}`)", "", behaviour_text, ""]
    sections += ["## Notes", ""] + [f"- {note}" for note in notes]
    write_text(out / "report.md", "\n".join(sections) + "\n")
    written = [out / "results.json", out / "report.md"]
    if not args.no_plots:
        written += [p for p in (plot_accuracy(out / "accuracy.png", models, results), cosine_plot) if p is not None]

    print(summary)
    if args.per_model:
        print("\n" + accuracy_markdown(models, results, per_model=True))
    if behaviour is not None:
        print("\n" + behaviour_text)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def _evaluate_builtin(args, tasks, entries) -> tuple[list, dict, str, tuple]:
    """Our scorer: (results, timing, device, (behaviour, behaviour text, cosine plot))."""
    from ..data.formatting import PromptFormat
    from ..eval.scoring import ScoringConfig
    from ..lora.layout import layout_from_config
    from ..models.registry import load_base_model

    model, tokenizer = load_base_model(args.base_model, args.dtype, _device(args.device))
    fmt = PromptFormat(answer_style=args.format, chat_template=args.chat_template, use_system=args.use_system)
    config = ScoringConfig(fmt=fmt, reduction=args.reduction, max_rows=args.max_rows, progress=False)
    groups: dict[tuple, list[AdapterEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.rank, entry.targets), []).append(entry)
    layouts = {key: layout_from_config(model.config.to_dict(), rank=key[0], targets=key[1], name=f"{args.base_model}-r{key[0]}")
               for key in groups}
    results, timing = _evaluate(args, model, tokenizer, tasks, config, groups, layouts)
    behaviour = (None, "", None)
    if args.probes:
        behaviour = _delta_behaviour(args, model, tokenizer, entries, groups, layouts)
    return results, timing, str(model.device), behaviour


def _evaluate_harness(args, tasks, entries, out: Path) -> tuple[list, dict, str, dict]:
    """lm-evaluation-harness: the tasks written as lm-eval configs into ``<out>/lm_eval_tasks`` and
    scored by its HF model, adapters through ``peft=``; (results, timing, device, harness section)."""
    import tempfile

    from transformers import AutoConfig, AutoTokenizer

    from ..data.formatting import PromptFormat
    from ..eval import harness
    from ..lora.layout import layout_from_config
    from ..models.registry import resolve_base_model

    if args.probes:
        raise LLGBMError("--probes: delta behaviour needs the built-in scorer (--backend builtin)")
    harness.import_lm_eval()
    model_dir = resolve_base_model(args.base_model)
    device = _device(args.device)
    fmt = PromptFormat(answer_style=args.format, chat_template=args.chat_template, use_system=args.use_system)
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if args.chat_template else None
    tasks_dir = out / "lm_eval_tasks"
    written = harness.write_tasks(tasks, tasks_dir, fmt, tokenizer, args.limit, args.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="llgbm-peft-") as tmp:
        config = AutoConfig.from_pretrained(model_dir).to_dict()
        models = [harness.HarnessModel("base")]
        for i, e in enumerate(entries):
            layout = layout_from_config(config, rank=e.rank, targets=e.targets, name=f"{args.base_model}-r{e.rank}")
            adapter = harness.peft_directory(e.path, layout, Path(tmp) / str(i), str(model_dir))
            models.append(harness.HarnessModel(e.label, adapter))
        results, metrics, timing = harness.evaluate_models(
            model_dir, models, written, tasks_dir, args.reduction, device, args.dtype, args.max_rows)
    section = {"lm_eval_version": harness.lm_eval_version(), "tasks_dir": str(tasks_dir),
               "task_names": {t.task.name: t.name for t in written}, "metrics": metrics}
    return results, timing, device, section


def _harness_markdown(metrics: dict) -> str:
    """lm-eval's aggregate metrics (%) per model and task."""
    rows = [f"| {model} | {task} | " + ", ".join(f"{name} {100 * value:.1f}" for name, value in found.items()) + " |"
            for model, by_task in metrics.items() for task, found in by_task.items()]
    return "\n".join(["| model | task | metrics (%) |", "|---|---|---|"] + rows)


def _evaluate(args, model, tokenizer, tasks, config, groups, layouts) -> tuple[list, dict]:
    """Every task for the base model, then for the adapters, K of one layout per pass; (results, timing)."""
    from tqdm.auto import tqdm

    from ..delta.deltas import load_teacher_factors
    from ..delta.functional import FunctionalLoRA
    from ..eval.scoring import AdapterBatch, answer_style, evaluate_task

    def task_config(task):
        default = 256 if answer_style(task) == "gsm8k" else 32
        return replace(config, max_new_tokens=args.max_new_tokens or default)

    k_max = args.adapters_per_forward
    chunks = [(key, group[i : i + k_max]) for key, group in groups.items() for i in range(0, len(group), k_max)]
    dtype = next(model.parameters()).dtype
    results, clock = [], {"base": [0.0, 0], "adapters": [0.0, 0]}  # seconds, (model, example) evaluations
    with tqdm(total=len(tasks) * (1 + len(chunks)), desc="evaluating", unit="task", disable=args.no_progress) as bar:
        for key, chunk in [(None, [])] + chunks:
            batch, labels = None, None
            if chunk:
                factors = load_teacher_factors([e.path for e in chunk], layouts[key], dtype, model.device)
                batch, labels = AdapterBatch(FunctionalLoRA(model, layouts[key]), factors), [e.label for e in chunk]
            for task in tasks:
                start = time.perf_counter()
                found = evaluate_task(model, tokenizer, task, task_config(task), batch, labels, args.limit)
                kind = "adapters" if chunk else "base"
                clock[kind][0] += time.perf_counter() - start
                clock[kind][1] += sum(r.total for r in found)
                results += found
                bar.update()
    timing = {kind: {"seconds": round(s, 3), "examples": n, "examples_per_s": round(n / s, 2) if s else None}
              for kind, (s, n) in clock.items() if n}
    return results, timing


def _delta_behaviour(args, model, tokenizer, entries, groups, layouts):
    """Δ of every adapter on the probe set; specificity of generated vs trained, or trained task cosines."""
    import torch

    from ..delta.deltas import DeltaComputer
    from ..delta.probes import get_probe_set
    from ..eval.behaviour import cosine_matrix, delta_specificity, task_means
    from ..eval.report import behaviour_markdown, plot_heatmap

    probes = get_probe_set(args.probes)
    deltas = {}
    for key, group in groups.items():
        computer = DeltaComputer(model, tokenizer, layouts[key], probes)
        found = computer.teacher_deltas([e.path for e in group], batch_size=args.adapters_per_forward, progress=not args.no_progress)
        deltas.update({e.label: d for e, d in zip(group, found)})
    trained = [e for e in entries if e.role == "adapter" and e.task]
    trained_tasks = list(dict.fromkeys(e.task for e in trained))
    generated = [e for e in entries if e.role == "generated" and e.task in trained_tasks]
    plot_path = Path(args.out) / "delta_cosines.png"
    if generated and len(trained_tasks) >= 2:
        report = delta_specificity(
            torch.stack([deltas[e.label] for e in generated]), [e.task for e in generated],
            torch.stack([deltas[e.label] for e in trained]), [e.task for e in trained],
            reference=args.reference, labels=[e.label for e in generated],
        )
        plot = None if args.no_plots else plot_heatmap(plot_path, report.cosines.numpy(), [e.label for e in generated],
                                                       report.teacher_tasks, "generated Δ vs teacher tasks (cosine)")
        return {**report.to_dict(), "probes": args.probes}, behaviour_markdown(report), plot
    if len(trained_tasks) >= 1:
        names, means = task_means(torch.stack([deltas[e.label] for e in trained]), [e.task for e in trained])
        cosines = cosine_matrix(means, means)
        header = "| task | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)
        rows = "\n".join(f"| {n} | " + " | ".join(f"{c:.3f}" for c in row) + " |" for n, row in zip(names, cosines.tolist()))
        plot = None if args.no_plots else plot_heatmap(plot_path, cosines.numpy(), names, names, "teacher Δ cosines (task means)")
        text = "Cosines between the task-mean deltas of trained adapters:\n\n" + header + "\n" + rows
        return {"probes": args.probes, "teacher_tasks": names, "task_mean_cosines": cosines.tolist()}, text, plot
    return {"probes": args.probes}, "No trained adapter with a known task: no delta comparison.", None


def _notes(args, entries: list[AdapterEntry]) -> list[str]:
    notes = [
        "The base model is the control: an adapter helps only where it beats the base row.",
        "Scoring is deterministic (option log-likelihood, greedy decoding) in the format teachers were trained "
        "with; DnD's reported numbers used vLLM sampling at T=0.95 with another chat template and parsed 20 "
        "characters, so they are not comparable.",
    ]
    unknown = [e.label for e in entries if e.task is None]
    if unknown:
        notes.append(f"No task found for {len(unknown)} adapter(s) ({', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}); "
                     f"name them after a task or add prompts.json with a 'task' key.")
    if any(e.role == "generated" for e in entries):
        notes.append(
            "Generated adapters: compare them with the base model and with the trained adapters of their task. "
            "Also evaluate adapters generated from random or nonsense prompts (Text-to-LoRA's control: "
            "'dogs;cats;bananas;', random characters): if those score as well, the generator ignores its prompts. "
            "Delta specificity (--probes) measures the same in function space: cos to the own task's teachers "
            "minus the mean cos to other tasks' teachers."
        )
        if not args.probes:
            notes.append("Run with --probes generic to add delta cosine, specificity and top-1 of generated adapters.")
    return notes
