"""Comparisons of generator variants: train each (variant, seed) on the same teachers, generate adapters
for the evaluated tasks, and measure how they behave against the base model and the teachers.

Used by ``llgbm demo`` (weight-only vs LLGBM on held-out synthetic tasks) and ``llgbm ablate`` (modes,
λ grids, N, probe sets over several seeds). Every trained run is cached in its own folder and skipped
when complete, so re-running a comparison only evaluates.

Measures per generated adapter (evaluated task t):
  * accuracy on t's test split (option log-likelihood or exact match, in the teachers' answer format);
  * Δ cosine to t's teachers (mean Δ of t's snapshots), the mean cosine to the other tasks' teachers,
    specificity = their difference, and top-1 (nearest teacher task is t).
Reference rows: the base model, and the teachers themselves (last snapshot of each task). Controls:
adapters generated from another task's prompts ("mismatched") and from random word lists ("random").
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..config import load_config, to_dict
from ..data.formatting import PromptFormat
from ..data.records import Task
from ..data.teacher_set import TeacherSet, load_teacher_set
from ..errors import LLGBMError
from ..lora.factors import LoraFactors

MODEL_ROWS = ("base", "teacher")


@dataclass(frozen=True)
class Variant:
    """One generator configuration: a name and ``key=value`` overrides of the training config."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComparisonConfig:
    """What to train and how to evaluate (loadable from YAML with ``llgbm_ext.config``).

    Attributes:
        teachers: teacher directory (manifest.json).
        training: base training config (YAML) every variant starts from (None: built-in defaults).
        overrides: ``key=value`` overrides common to all variants.
        variants: the configurations compared.
        seeds: one training run per variant and seed.
        held_out: tasks left out of generator training and evaluated (leave-one-task-out).
        eval_in_distribution: also evaluate these training tasks (in-distribution reference).
        data_dir: DnD-format task folder for non-synthetic tasks' test splits.
        eval_limit: test examples per task (None: all).
        samples: adapters generated per task (each from another draw of its prompts).
        controls: evaluate mismatched-prompt and random-prompt adapters for these variants.
        out_dir: runs go to ``<out_dir>/runs/<variant>/seed<k>``, reports to ``<out_dir>``.
    """

    teachers: str = "runs/demo/teachers"
    training: str | None = None
    overrides: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = (Variant("weight_only", ("loss.mode=weight_only",)),
                                     Variant("llgbm", ("loss.mode=multitask",)))
    seeds: tuple[int, ...] = (0,)
    held_out: tuple[str, ...] = ()
    eval_in_distribution: tuple[str, ...] = ()
    data_dir: str | None = None
    eval_limit: int | None = 64
    samples: int = 2
    controls: tuple[str, ...] = ("llgbm",)
    out_dir: str = "runs/compare"


def run_folder(cfg: ComparisonConfig, variant: Variant, seed: int) -> Path:
    return Path(cfg.out_dir) / "runs" / variant.name / f"seed{seed}"


def training_config(cfg: ComparisonConfig, variant: Variant, seed: int):
    """The TrainingConfig of one (variant, seed) run."""
    from ..training import TrainingConfig

    held_out = "[" + ", ".join(cfg.held_out) + "]"
    overrides = [f"data.teachers={cfg.teachers}", f"data.held_out={held_out}", *cfg.overrides, *variant.overrides,
                 f"seed={seed}", f"generator.seed={seed}", f"out_dir={run_folder(cfg, variant, seed)}"]
    return load_config(TrainingConfig, cfg.training, overrides)


def train_runs(cfg: ComparisonConfig, progress: bool = True) -> dict[tuple[str, int], Path | None]:
    """Train every (variant, seed) not already complete; returns their run folders (None: the run diverged,
    which is reported and left out of the evaluation rather than ending the comparison)."""
    from ..training.checkpoint import latest_checkpoint
    from ..training.trainer import DivergedError, Trainer, config_digest

    runs = {}
    for variant in cfg.variants:
        for seed in cfg.seeds:
            tcfg = training_config(cfg, variant, seed)
            out = Path(tcfg.out_dir)
            latest = latest_checkpoint(out) if out.is_dir() else None
            state = json.loads((latest / "state.json").read_text()) if latest is not None else {}
            done = state.get("step") == tcfg.steps and state.get("config_digest") == config_digest(tcfg)
            if not done:
                if progress:
                    print(f"training {variant.name} (seed {seed}) -> {out}")
                trainer = Trainer(tcfg, resume=True, progress=progress).setup()
                try:
                    trainer.train()
                except DivergedError as e:
                    print(f"warning: {e}")
                    runs[(variant.name, seed)] = None
                    continue
                finally:
                    trainer.cleanup()
            runs[(variant.name, seed)] = out
    return runs


def evaluation_task(name: str, data_dir: str | None) -> Task:
    """A task with its test split: the synthetic suite's, or a DnD-format file in ``data_dir``."""
    from ..data.synthetic import TASK_FAMILIES, get_synthetic_task

    if name in TASK_FAMILIES:
        return get_synthetic_task(name)
    if data_dir is None:
        raise LLGBMError(f"task {name!r} is not synthetic: give data_dir (DnD-format task files)")
    from ..data.dnd_format import load_task

    return load_task(data_dir, name, splits=("test",))


def task_format(teachers: TeacherSet, task: str) -> PromptFormat:
    """The answer format the teachers of ``task`` were trained with (manifest), default cloze/option."""
    record = teachers.tasks.get(task, {}).get("format")
    return PromptFormat(**record) if record else PromptFormat()


def random_prompts(tokenizer, n: int, seed: int, words: int = 8) -> list[str]:
    """Prompts of random vocabulary words: a condition that identifies no task (control)."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    vocab = [t for t in (tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))) if t.isalpha()]
    return [" ".join(vocab[j] for j in rng.choice(len(vocab), size=words)) for _ in range(n)]


@dataclass
class Evaluator:
    """Shared evaluation state: base model, tasks, teacher deltas; measures K adapters at a time."""

    cfg: ComparisonConfig
    teachers: TeacherSet
    model: torch.nn.Module
    tokenizer: object
    computer: object  # DeltaComputer
    teacher_deltas: torch.Tensor  # (num_teachers, H)
    tasks: dict[str, Task] = field(default_factory=dict)
    progress: bool = True

    def accuracy(self, task: str, factors: LoraFactors | None) -> list[float]:
        """Accuracy on ``task`` of the base model (None) or of each of K adapters."""
        from ..eval.scoring import AdapterBatch, ScoringConfig, evaluate_task

        scoring = ScoringConfig(fmt=task_format(self.teachers, task), progress=False)
        adapters = None if factors is None else AdapterBatch(self.computer.lora, factors)
        results = evaluate_task(self.model, self.tokenizer, self.tasks[task], scoring, adapters, limit=self.cfg.eval_limit)
        return [r.accuracy for r in results]

    def behaviour(self, tasks: list[str], factors: LoraFactors) -> list[dict]:
        """Δ cosine / specificity / top-1 of K adapters meant for ``tasks``."""
        from ..eval.behaviour import delta_specificity

        with torch.no_grad():
            deltas = self.computer.deltas(factors).cpu()
        report = delta_specificity(deltas, tasks, self.teacher_deltas.cpu(), [e.task for e in self.teachers.entries])
        return [{"cos_own": a.cos_own, "cos_others": a.cos_others, "specificity": a.specificity,
                 "top1": float(a.top1)} for a in report.adapters]


def build_evaluator(cfg: ComparisonConfig, progress: bool = True) -> Evaluator:
    """Load the base model and the teachers' deltas once for all evaluations."""
    from ..delta.cache import DeltaCache
    from ..delta.deltas import DeltaComputer
    from ..delta.probes import get_probe_set
    from ..delta.teacher import cached_teacher_deltas, delta_context
    from ..models.registry import load_base_model, resolve_base_model

    teachers = load_teacher_set(cfg.teachers)
    reference = training_config(cfg, cfg.variants[0], cfg.seeds[0])
    model_dir = resolve_base_model(teachers.model_name)
    model, tokenizer = load_base_model(model_dir, dtype=reference.dtype)
    probes = get_probe_set(reference.delta.probes, chat_template=True if reference.delta.chat_template else None)
    computer = DeltaComputer(model, tokenizer, teachers.layout, probes, layer=reference.delta.layer)
    cache = DeltaCache(reference.delta.cache or Path(cfg.teachers) / "deltas")
    deltas = cached_teacher_deltas(computer, cache, delta_context(computer, teachers.model_name, model_dir),
                                   [e.path for e in teachers.entries], [e.task for e in teachers.entries],
                                   progress=progress)
    names = list(dict.fromkeys([*cfg.held_out, *cfg.eval_in_distribution]))
    tasks = {name: evaluation_task(name, cfg.data_dir) for name in names}
    return Evaluator(cfg, teachers, model, tokenizer, computer, deltas, tasks, progress)


def _last_snapshots(teachers: TeacherSet, tasks: list[str]):
    return [max((e for e in teachers.entries if e.task == t), key=lambda e: e.step).path for t in tasks]


def evaluate(cfg: ComparisonConfig, runs: dict[tuple[str, int], Path], evaluator: Evaluator) -> list[dict]:
    """One row per (model, seed, task): accuracy and behaviour measures."""
    from ..delta.deltas import load_teacher_factors
    from ..training.generate import load_trained_generator, sample_prompts

    ev = evaluator
    tasks = list(ev.tasks)
    rows = []
    steps = len(tasks) * (2 + len(runs) * (1 + 2 * sum(v.name in cfg.controls for v in cfg.variants) / len(cfg.variants)))
    bar = tqdm(total=int(steps), desc="evaluate", unit="model-task", disable=not ev.progress)
    for task in tasks:
        rows.append({"model": "base", "seed": None, "task": task, "split": _split(cfg, task),
                     "accuracy": ev.accuracy(task, None)[0]})
        bar.update(1)
    teacher_factors = load_teacher_factors(_last_snapshots(ev.teachers, tasks), ev.teachers.layout,
                                           next(ev.model.parameters()).dtype, next(ev.model.parameters()).device)
    behaviour = ev.behaviour(tasks, teacher_factors)
    for k, task in enumerate(tasks):
        one = {p: (a[k : k + 1], b[k : k + 1]) for p, (a, b) in teacher_factors.items()}
        rows.append({"model": "teacher", "seed": None, "task": task, "split": _split(cfg, task),
                     "accuracy": ev.accuracy(task, one)[0], **behaviour[k]})
        bar.update(1)
    for (variant, seed), run in ((key, run) for key, run in runs.items() if run is not None):
        trained = load_trained_generator(run)
        n = trained.config.generator.num_prompts
        kinds = {"": [ev.teachers.prompts(t) if t in ev.teachers.tasks else ev.tasks[t].conditions for t in tasks]}
        if variant in cfg.controls:
            kinds["mismatched"] = kinds[""][1:] + kinds[""][:1]  # each task gets the next task's prompts
            kinds["random"] = [random_prompts(ev.tokenizer, max(n, 16), seed + i) for i in range(len(tasks))]
        for kind, pools in kinds.items():
            label = variant if not kind else f"{variant} ({kind} prompts)"
            prompt_lists = [draw for i, pool in enumerate(pools)
                            for draw in sample_prompts(pool, n, cfg.samples, seed + 1000 * i)]
            factors = trained.factors(prompt_lists)
            measures = ev.behaviour([t for t in tasks for _ in range(cfg.samples)], factors)
            for i, task in enumerate(tasks):
                block = slice(i * cfg.samples, (i + 1) * cfg.samples)
                accuracies = ev.accuracy(task, {p: (a[block], b[block]) for p, (a, b) in factors.items()})
                rows.append({"model": label, "seed": seed, "task": task, "split": _split(cfg, task),
                             "accuracy": statistics.fmean(accuracies),
                             **{key: statistics.fmean(m[key] for m in measures[block]) for key in measures[0]}})
                bar.update(1)
    bar.close()
    return rows


def _split(cfg: ComparisonConfig, task: str) -> str:
    return "held-out" if task in cfg.held_out else "in-distribution"


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds of the per-seed means over held-out tasks, per model and split."""
    measures = ("accuracy", "cos_own", "specificity", "top1")
    groups: dict[tuple[str, str], dict[int | None, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["split"]), {}).setdefault(row["seed"], []).append(row)
    summary = []
    for (model, split), by_seed in groups.items():
        entry = {"model": model, "split": split, "seeds": len(by_seed)}
        for key in measures:
            per_seed = [statistics.fmean(r[key] for r in seed_rows) for seed_rows in by_seed.values()
                        if all(key in r and not math.isnan(r[key]) for r in seed_rows)]
            if per_seed:
                entry[key] = statistics.fmean(per_seed)
                entry[key + "_std"] = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict], split: str = "held-out") -> str:
    """The comparison table: accuracy and delta measures per model (mean ± std over seeds)."""

    def cell(entry, key, percent=False):
        if key not in entry:
            return "–"
        scale = 100.0 if percent else 1.0
        text = f"{entry[key] * scale:.1f}" if percent else f"{entry[key]:.3f}"
        if entry["seeds"] > 1:
            text += f" ± {entry[key + '_std'] * scale:.1f}" if percent else f" ± {entry[key + '_std']:.3f}"
        return text

    lines = ["| model | accuracy % | Δ cos to own teacher | specificity | top-1 |", "|---|---:|---:|---:|---:|"]
    for entry in summary:
        if entry["split"] == split:
            lines.append(f"| {entry['model']} | {cell(entry, 'accuracy', True)} | {cell(entry, 'cos_own')} | "
                         f"{cell(entry, 'specificity')} | {cell(entry, 'top1')} |")
    return "\n".join(lines)


def write_report(cfg: ComparisonConfig, rows: list[dict], summary: list[dict],
                 diverged: tuple[str, ...] = ()) -> list[Path]:
    """results.json, results.csv, report.md and comparison.png in ``cfg.out_dir``; ``diverged`` names the
    runs (``variant seedK``) that produced a non-finite loss and are missing from the tables."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps({"config": to_dict(cfg), "rows": rows, "summary": summary,
                                                 "diverged": list(diverged)}, indent=1, default=str) + "\n")
    keys = ["model", "seed", "task", "split", "accuracy", "cos_own", "cos_others", "specificity", "top1"]
    csv = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in rows]
    write_text(out / "results.csv", "\n".join(csv) + "\n")
    report = ["# Comparison", "", f"Teachers: `{cfg.teachers}`; held-out tasks: {', '.join(cfg.held_out) or '–'}; "
              f"seeds: {', '.join(map(str, cfg.seeds))}.", "", "## Held-out tasks", "", markdown_table(summary, "held-out")]
    if cfg.eval_in_distribution:
        report += ["", "## In-distribution tasks", "", markdown_table(summary, "in-distribution")]
    if diverged:
        report += ["", f"Diverged (non-finite loss; left out of the tables): {', '.join(diverged)}."]
    write_text(out / "report.md", "\n".join(report) + "\n")
    written = [out / "results.json", out / "results.csv", out / "report.md"]
    png = plot_summary(summary, out / "comparison.png")
    return written + ([png] if png else [])


def plot_summary(summary: list[dict], path: Path) -> Path | None:
    """Bars of held-out accuracy and specificity per model, with std over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..atomic import atomic_path

    held = [e for e in summary if e["split"] == "held-out"]
    if not held:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "accuracy", "held-out accuracy"), (axes[1], "specificity", "Δ specificity")):
        entries = [e for e in held if key in e]
        ax.bar(range(len(entries)), [e[key] for e in entries], yerr=[e.get(key + "_std", 0) for e in entries],
               color=plt.cm.tab10(np.arange(len(entries)) % 10), capsize=3)
        ax.set_xticks(range(len(entries)), [e["model"] for e in entries], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def run_comparison(cfg: ComparisonConfig, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train (or reuse) every run, evaluate, write the report; returns (rows, summary)."""
    if not cfg.held_out:
        raise LLGBMError("a comparison needs held-out tasks to evaluate (held_out)")
    runs = train_runs(cfg, progress)
    evaluator = build_evaluator(cfg, progress)
    rows = evaluate(cfg, runs, evaluator)
    summary = summarise(rows)
    diverged = tuple(f"{variant} seed{seed}" for (variant, seed), run in runs.items() if run is None)
    write_report(cfg, rows, summary, diverged)
    return rows, summary
