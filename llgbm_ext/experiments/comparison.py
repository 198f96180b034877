"""Comparisons of generator variants: train each (variant, seed) on the same teachers, generate adapters
for the evaluated tasks, and measure how they behave against the base model and the teachers.

Used by ``llgbm demo`` (weight-only vs LLGBM on held-out synthetic tasks) and ``llgbm ablate`` (modes,
λ grids, N, probe sets over several seeds). Every trained run is cached in its own folder and skipped
when complete, so re-running a comparison only evaluates.

Tasks are evaluated in up to three splits: ``held-out`` (never seen by the generators; reported),
``validation`` (never seen either; settings are chosen on it) and ``in-distribution`` (training tasks,
by default the first of each family). Measures per adapter and evaluated task t:
  * accuracy on t's test split (option log-likelihood or exact match, in the teachers' answer format);
  * recovery = (accuracy − base) / (teacher − base) on t: the share of the teacher's gain over the base
    model the adapter gets (0: base, 1: teacher); undefined (NaN) where the teacher is within one test
    example of the base model, since there is no gain to recover;
  * Δ cosine to t's teachers (mean Δ of t's snapshots), the mean cosine to the other tasks' teachers,
    specificity = their difference, top-1 (nearest teacher task is t), and the norm ratio |Δ| / |Δ of
    t's teachers| (a cosine says nothing about how far an adapter moves the model);
  * nearest: the task whose teachers' mean Δ is nearest by cosine (what top-1 checks; for several sampled
    adapters, the most frequent one): when an adapter fails, whose behaviour it has instead.
Reference rows: the base model, the teachers themselves (last snapshot of each task) and the multitask
LoRA baseline (one LoRA trained on all training tasks, per seed; ``teachers.multitask``). Controls:
adapters generated from another task's prompts ("mismatched") and from random word lists ("random").
Summaries average each measure over a split's tasks per seed, then give mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..config import load_config, to_dict
from ..data.records import Task
from ..data.teacher_set import TeacherSet, load_teacher_set
from ..errors import LLGBMError
from ..eval.tasks import task_with_test_split
from ..eval.uncertainty import recovery
from ..lora.factors import LoraFactors
from ..teachers.multitask import NAME as MULTITASK
from ..teachers.multitask import task_format

AUTO = "auto"  # eval_in_distribution: the first training task of each family
SPLITS = {"held-out": "never seen by the generators", "in-distribution": "generator training tasks",
          "validation": "never seen by the generators, for choosing settings"}
MEASURES = ("accuracy", "cos_own", "norm_ratio", "specificity", "top1")
NOTE = ("recovery: (accuracy − base) / (teacher − base) per task, 0 = base model, 1 = the task's teacher; a "
        "split's value is the mean over its tasks per seed (± std over seeds), leaving out tasks whose teacher is "
        "within one test example of the base model (nothing to recover). Δ cos: cosine of the adapter's delta to its "
        "task's teacher delta; norm ratio: |Δ| of the adapter over |Δ| of its task's teachers; specificity: Δ cos "
        "minus the mean cosine to the other tasks' teachers; top-1: the nearest teacher is the right task.")


@dataclass(frozen=True)
class Variant:
    """One generator configuration: a name, ``key=value`` overrides of the training config, and what it
    is in words (for the report)."""

    name: str
    overrides: tuple[str, ...] = ()
    description: str = ""


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
        validation: tasks left out of generator training too, evaluated in their own split to choose settings
            on (never on ``held_out``).
        exclude: tasks left out of generator training and not evaluated (e.g. the held-out tasks while
            settings are chosen on ``validation``).
        eval_in_distribution: training tasks also evaluated (the ``in-distribution`` split); ``[auto]`` (the
            default) or empty: the first training task of each family in manifest order (a teacher set
            without families: its first training task).
        data_dir: DnD-format task folder for non-synthetic tasks' test splits.
        eval_limit: test examples per task (None: all).
        held_out_limit: test examples per held-out task (None: ``eval_limit``), so the reported tasks can
            be measured on more examples than the in-distribution and validation ones.
        samples: adapters generated per task (each from another draw of its prompts).
        controls: evaluate mismatched-prompt and random-prompt adapters for these variants.
        workers: train the runs and multitask LoRAs in this many processes of one torch thread each (1: in
            this process).
        probes: the probe set of the Δ measures (cosine to the teachers, specificity, top-1), the same
            for every variant, whatever probes a variant trains with.
        multitask_lora: also train and evaluate the multitask LoRA baseline (one LoRA on the mixture of the
            training tasks per seed, cached in ``<out_dir>/runs/multitask_lora/seed<k>``).
        multitask_lora_steps, multitask_lora_batch: its budget: optimizer steps, and sequences per step, split
            equally over the training tasks (rounded up to a multiple of their number).
        multitask_lora_lr: its learning rate (None: the teachers' default); the rest as teachers.
        out_dir: runs go to ``<out_dir>/runs/<variant>/seed<k>``, reports to ``<out_dir>``.
    """

    teachers: str = "runs/demo/teachers"
    training: str | None = None
    overrides: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = (Variant("weight_only", ("loss.mode=weight_only",)),
                                     Variant("llgbm", ("loss.mode=multitask",)))
    seeds: tuple[int, ...] = (0,)
    held_out: tuple[str, ...] = ()
    validation: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    eval_in_distribution: tuple[str, ...] = (AUTO,)
    data_dir: str | None = None
    eval_limit: int | None = 64
    held_out_limit: int | None = None
    samples: int = 2
    controls: tuple[str, ...] = ("llgbm",)
    probes: str = "generic"
    multitask_lora: bool = True
    multitask_lora_steps: int = 400
    multitask_lora_batch: int = 20
    multitask_lora_lr: float | None = None
    workers: int = 1
    out_dir: str = "runs/compare"

    def __post_init__(self):
        for name in ("multitask_lora_steps", "multitask_lora_batch", "workers"):
            if getattr(self, name) < 1:
                raise LLGBMError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.multitask_lora_lr is not None and not self.multitask_lora_lr > 0:
            raise LLGBMError(f"multitask_lora_lr must be positive (or null), got {self.multitask_lora_lr}")
        if self.held_out_limit is not None and self.held_out_limit < 1:
            raise LLGBMError(f"held_out_limit must be at least 1 (or null), got {self.held_out_limit}")
        taken = next((v.name for v in self.variants if v.name in ("base", "teacher", MULTITASK)), None)
        if taken:
            raise LLGBMError(f"variants: {taken!r} names a reference row; give the variant another name")


def left_out(cfg: ComparisonConfig) -> tuple[str, ...]:
    """The tasks no generator trains on: held-out, validation and excluded."""
    return (*cfg.held_out, *cfg.validation, *cfg.exclude)


def run_folder(cfg: ComparisonConfig, name: str, seed: int) -> Path:
    return Path(cfg.out_dir) / "runs" / name / f"seed{seed}"


def training_config(cfg: ComparisonConfig, variant: Variant, seed: int):
    """The TrainingConfig of one (variant, seed) run."""
    from ..training import TrainingConfig

    held_out = "[" + ", ".join(left_out(cfg)) + "]"
    validation = [f"eval.tasks=[{', '.join(cfg.validation)}]"] if cfg.validation else []  # logged at eval.every
    overrides = [f"data.teachers={cfg.teachers}", f"data.held_out={held_out}", *validation, *cfg.overrides,
                 *variant.overrides,
                 f"seed={seed}", f"generator.seed={seed}", f"out_dir={run_folder(cfg, variant.name, seed)}"]
    return load_config(TrainingConfig, cfg.training, overrides)


def _train_one(tcfg, progress: bool, threads: int | None) -> Path | None:
    """Train (or finish) one run; None if it diverged. ``threads``: torch threads of a worker process."""
    from ..training.trainer import DivergedError, Trainer

    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(tcfg, resume=True, progress=progress).setup()
    try:
        trainer.train()
    except DivergedError as e:
        print(f"warning: {e}", flush=True)
        return None
    finally:
        trainer.cleanup()
    return Path(tcfg.out_dir)


def _train_multitask_one(cfg: ComparisonConfig, seed: int, progress: bool, threads: int | None) -> Path:
    """The multitask LoRA of one seed (trained unless cached), on a base model loaded here."""
    from ..models.registry import load_base_model, resolve_base_model
    from ..teachers.multitask import train_multitask_lora

    if threads:
        torch.set_num_threads(threads)
    teachers = load_teacher_set(cfg.teachers)
    config = _multitask_config(cfg, teachers, seed)
    model, tokenizer = load_base_model(resolve_base_model(teachers.model_name), dtype=config.dtype)
    return train_multitask_lora(model, tokenizer, teachers, config, run_folder(cfg, MULTITASK, seed), cfg.data_dir,
                                progress)


def _multitask_config(cfg: ComparisonConfig, teachers: TeacherSet, seed: int):
    """The multitask LoRA's settings for ``seed``, in the evaluator's dtype."""
    from ..teachers.multitask import multitask_config

    training = [t for t in teachers.task_names() if t not in left_out(cfg)]
    config = multitask_config(teachers, training, cfg.multitask_lora_steps, cfg.multitask_lora_batch, seed)
    lr = {"lr": cfg.multitask_lora_lr} if cfg.multitask_lora_lr is not None else {}
    return replace(config, dtype=training_config(cfg, cfg.variants[0], seed).dtype, **lr)


def _cost(tcfg) -> float:
    """Rough relative cost of a run: its steps, times the base-model forwards of its behaviour signals."""
    signals = len(tcfg.loss.signals) if tcfg.loss.uses_delta else 0
    return tcfg.steps * (1 + 4 * signals / (tcfg.loss.delta_every if tcfg.loss.mode == "delta_guided" else 1))


def schedule(jobs: list[tuple]) -> list[tuple]:
    """Jobs ``(key, cost, ...)`` in the order processes take them: the first job of each kind (variant or
    multitask LoRA), then the rest, each part longest first. Runs of one kind share the targets they cache
    on first use (teacher logits, prompt embeddings); started side by side, two of them would both compute
    those, so the processes start on different kinds, and still finish together."""
    ordered = sorted(jobs, key=lambda job: -job[1])
    kinds = {job[0][0]: job for job in reversed(ordered)}  # each kind's first job in ``ordered``
    first = [job for job in ordered if kinds[job[0][0]] is job]
    return first + [job for job in ordered if kinds[job[0][0]] is not job]


def train_runs(cfg: ComparisonConfig, progress: bool = True) -> tuple[dict[tuple[str, int], Path | None],
                                                                     dict[int, Path]]:
    """Train every (variant, seed) not already complete, and the multitask LoRAs (``cfg.multitask_lora``);
    returns (run folders, multitask LoRA of each seed). A run folder is None where the run diverged, which
    is reported and left out of the evaluation rather than ending the comparison.

    With ``cfg.workers`` > 1 all of them are trained in that many processes of one torch thread each, in
    the order of ``schedule``; a run on one thread computes the same numbers whatever the core count (not
    across CPU types: kernels round differently)."""
    from ..training.checkpoint import latest_checkpoint
    from ..training.trainer import config_digest

    runs, jobs = {}, []  # jobs: (key, cost, function, its arguments before progress and threads)
    for variant in cfg.variants:
        for seed in cfg.seeds:
            tcfg = training_config(cfg, variant, seed)
            out = Path(tcfg.out_dir)
            latest = latest_checkpoint(out) if out.is_dir() else None
            state = json.loads((latest / "state.json").read_text()) if latest is not None else {}
            runs[(variant.name, seed)] = out
            if not (state.get("step") == tcfg.steps and state.get("config_digest") == config_digest(tcfg)):
                jobs.append(((variant.name, seed), _cost(tcfg), _train_one, (tcfg,)))
    multitask = {seed: run_folder(cfg, MULTITASK, seed) for seed in cfg.seeds} if cfg.multitask_lora else {}
    if multitask:
        from ..teachers.multitask import is_trained

        teachers = load_teacher_set(cfg.teachers)
        cost = 7 * cfg.multitask_lora_steps  # a step: about 1.4 KL steps of _cost (measured on tiny)
        jobs += [((MULTITASK, seed), cost, _train_multitask_one, (cfg, seed)) for seed, out in multitask.items()
                 if not is_trained(teachers, _multitask_config(cfg, teachers, seed), out)]
    jobs = schedule(jobs)
    done = {}
    if cfg.workers <= 1:
        for key, _, function, args in jobs:
            if progress and function is _train_one:
                print(f"training {key[0]} (seed {key[1]}) -> {args[0].out_dir}", flush=True)
            done[key] = function(*args, progress, None)
    else:
        import concurrent.futures

        from ..workers import worker_pool

        with worker_pool(cfg.workers) as pool, \
                tqdm(total=len(jobs), desc=f"training ({cfg.workers} processes)", unit="run",
                     disable=not progress) as bar:
            futures = {pool.submit(function, *args, False, 1): key for key, _, function, args in jobs}
            for future in concurrent.futures.as_completed(futures):
                done[futures[future]] = future.result()
                bar.update(1)
    runs.update({key: path for key, path in done.items() if key[0] != MULTITASK})
    return runs, multitask


def random_prompts(tokenizer, n: int, seed: int, words: int = 8) -> list[str]:
    """Prompts of random vocabulary words: a condition that identifies no task (control)."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    vocab = [t for t in (tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))) if t.isalpha()]
    return [" ".join(vocab[j] for j in rng.choice(len(vocab), size=words)) for _ in range(n)]


def in_distribution_tasks(cfg: ComparisonConfig, teachers: TeacherSet) -> tuple[str, ...]:
    """The training tasks of the in-distribution split: ``cfg.eval_in_distribution``, or for ``auto`` (or
    empty) the first training task of each family in manifest order (family from the manifest, else the
    synthetic suite's; tasks without one form one family)."""
    from ..data.synthetic import TASK_FAMILIES

    if cfg.eval_in_distribution not in ((), (AUTO,)):
        return cfg.eval_in_distribution
    first: dict[str, str] = {}
    for task, info in teachers.tasks.items():
        if task not in left_out(cfg):
            family = info.get("family") or (TASK_FAMILIES[task][0].name if task in TASK_FAMILIES else "")
            first.setdefault(family, task)
    return tuple(first.values())


@dataclass
class Evaluator:
    """Shared evaluation state: base model, tasks, teacher deltas; measures K adapters at a time.
    ``cfg`` is the comparison with its in-distribution tasks resolved."""

    cfg: ComparisonConfig
    teachers: TeacherSet
    model: torch.nn.Module
    tokenizer: object
    computer: object  # DeltaComputer
    teacher_deltas: torch.Tensor  # (num_teachers, H), CPU
    tasks: dict[str, Task] = field(default_factory=dict)
    progress: bool = True

    def accuracy(self, task: str, factors: LoraFactors | None) -> tuple[list[float], int]:
        """Accuracy on ``task`` of the base model (None) or of each of K adapters, and the test examples scored."""
        from ..eval.scoring import AdapterBatch, ScoringConfig, evaluate_task

        scoring = ScoringConfig(fmt=task_format(self.teachers, task), progress=False)
        adapters = None if factors is None else AdapterBatch(self.computer.lora, factors)
        limit = self.cfg.eval_limit
        if task in self.cfg.held_out and self.cfg.held_out_limit is not None:
            limit = self.cfg.held_out_limit
        results = evaluate_task(self.model, self.tokenizer, self.tasks[task], scoring, adapters, limit=limit)
        return [r.accuracy for r in results], results[0].total

    def deltas(self, factors: LoraFactors) -> torch.Tensor:
        """(K, H) Δ of K adapters on the comparison's probes, CPU."""
        with torch.no_grad():
            return self.computer.deltas(factors).cpu()

    def behaviour(self, tasks: list[str], deltas: torch.Tensor) -> list[dict]:
        """Δ cosine / specificity / top-1 / norm ratio / nearest teacher task of N adapters (``deltas`` (N, H))
        meant for ``tasks``."""
        from ..eval.behaviour import delta_specificity, task_means

        labels = [e.task for e in self.teachers.entries]
        report = delta_specificity(deltas, tasks, self.teacher_deltas, labels)
        names, means = task_means(self.teacher_deltas, labels)
        ratios = deltas.float().norm(dim=1) / means[[names.index(t) for t in tasks]].norm(dim=1)
        return [{"cos_own": a.cos_own, "cos_others": a.cos_others, "specificity": a.specificity, "top1": float(a.top1),
                 "norm_ratio": float(r), "nearest": a.nearest_task} for a, r in zip(report.adapters, ratios)]


def build_evaluator(cfg: ComparisonConfig, progress: bool = True) -> Evaluator:
    """Load the base model and the teachers' deltas once for all evaluations."""
    from ..delta.cache import DeltaCache
    from ..delta.deltas import DeltaComputer
    from ..delta.probes import get_probe_set
    from ..delta.teacher import cached_teacher_deltas, delta_context
    from ..models.registry import load_base_model, resolve_base_model

    teachers = load_teacher_set(cfg.teachers)
    cfg = replace(cfg, eval_in_distribution=in_distribution_tasks(cfg, teachers))
    reference = training_config(cfg, cfg.variants[0], cfg.seeds[0])
    model_dir = resolve_base_model(teachers.model_name)
    model, tokenizer = load_base_model(model_dir, dtype=reference.dtype)
    probes = get_probe_set(cfg.probes)
    computer = DeltaComputer(model, tokenizer, teachers.layout, probes, layer=reference.delta.layer)
    cache = DeltaCache(reference.delta.cache or Path(cfg.teachers) / "deltas")
    deltas = cached_teacher_deltas(computer, cache, delta_context(computer, teachers.model_name, model_dir),
                                   [e.path for e in teachers.entries], [e.task for e in teachers.entries],
                                   progress=progress)
    names = list(dict.fromkeys([*cfg.held_out, *cfg.validation, *cfg.eval_in_distribution]))
    tasks = {name: task_with_test_split(name, cfg.data_dir) for name in names}
    return Evaluator(cfg, teachers, model, tokenizer, computer, deltas.float().cpu(), tasks, progress)


def _last_snapshots(teachers: TeacherSet, tasks: list[str]):
    return [max((e for e in teachers.entries if e.task == t), key=lambda e: e.step).path for t in tasks]


def evaluate(cfg: ComparisonConfig, runs: dict[tuple[str, int], Path], evaluator: Evaluator,
             multitask: dict[int, Path] | None = None) -> list[dict]:
    """One row per (model, seed, task): accuracy, behaviour measures and recovery. ``multitask``: the
    multitask LoRA of each seed."""
    from ..delta.deltas import load_teacher_factors
    from ..training.generate import load_trained_generator, sample_prompts

    ev = evaluator
    tasks = list(ev.tasks)
    multitask = multitask or {}
    param = next(ev.model.parameters())
    rows = []

    def add(model: str, seed: int | None, task: str, accuracy: float, examples: int, measures: dict | None = None):
        rows.append({"model": model, "seed": seed, "task": task, "split": _split(cfg, task), "accuracy": accuracy,
                     "examples": examples, **(measures or {})})

    trained = [key for key, run in runs.items() if run is not None]
    per_run = 1 + 2 * sum(v.name in cfg.controls for v in cfg.variants) / max(1, len(cfg.variants))  # with controls
    bar = tqdm(total=int(len(tasks) * (2 + len(trained) * per_run + bool(multitask))), desc="evaluate",
               unit="model-task", disable=not ev.progress)
    for task in tasks:
        accuracies, examples = ev.accuracy(task, None)
        add("base", None, task, accuracies[0], examples)
        bar.update(1)
    teacher_factors = load_teacher_factors(_last_snapshots(ev.teachers, tasks), ev.teachers.layout, param.dtype,
                                           param.device)
    behaviour = ev.behaviour(tasks, ev.deltas(teacher_factors))
    for k, task in enumerate(tasks):
        one = {p: (a[k : k + 1], b[k : k + 1]) for p, (a, b) in teacher_factors.items()}
        accuracies, examples = ev.accuracy(task, one)
        add("teacher", None, task, accuracies[0], examples, behaviour[k])
        bar.update(1)
    for variant, seed in trained:
        generator = load_trained_generator(runs[(variant, seed)])
        n = generator.config.generator.num_prompts
        kinds = {"": [ev.teachers.prompts(t) if t in ev.teachers.tasks else ev.tasks[t].conditions for t in tasks]}
        if variant in cfg.controls:
            kinds["mismatched"] = kinds[""][1:] + kinds[""][:1]  # each task gets the next task's prompts
            kinds["random"] = [random_prompts(ev.tokenizer, max(n, 16), seed + i) for i in range(len(tasks))]
        for kind, pools in kinds.items():
            label = variant if not kind else f"{variant} ({kind} prompts)"
            prompt_lists = [draw for i, pool in enumerate(pools)
                            for draw in sample_prompts(pool, n, cfg.samples, seed + 1000 * i)]
            factors = generator.factors(prompt_lists)
            measures = ev.behaviour([t for t in tasks for _ in range(cfg.samples)], ev.deltas(factors))
            for i, task in enumerate(tasks):
                block = slice(i * cfg.samples, (i + 1) * cfg.samples)
                accuracies, examples = ev.accuracy(task, {p: (a[block], b[block]) for p, (a, b) in factors.items()})
                add(label, seed, task, statistics.fmean(accuracies), examples,
                    {key: most_frequent([m[key] for m in measures[block]]) if key == "nearest"
                     else statistics.fmean(m[key] for m in measures[block]) for key in measures[0]})
                bar.update(1)
    if multitask:  # the seeds' adapters together: one Δ each, measured against every task
        seeds = list(multitask)
        factors = load_teacher_factors([multitask[s] for s in seeds], ev.teachers.layout, param.dtype, param.device)
        measures = ev.behaviour(tasks * len(seeds), ev.deltas(factors).repeat_interleave(len(tasks), 0))
        for i, task in enumerate(tasks):
            accuracies, examples = ev.accuracy(task, factors)
            for j, seed in enumerate(seeds):
                add(MULTITASK, seed, task, accuracies[j], examples, measures[j * len(tasks) + i])
            bar.update(1)
    bar.close()
    return add_recovery(rows)


def most_frequent(values: list[str]) -> str:
    """The most frequent value (ties: the first of them to appear)."""
    return Counter(values).most_common(1)[0][0]


def _split(cfg: ComparisonConfig, task: str) -> str:
    return "held-out" if task in cfg.held_out else "validation" if task in cfg.validation else "in-distribution"


def add_recovery(rows: list[dict]) -> list[dict]:
    """Set every row's ``recovery`` = (accuracy − base) / (teacher − base) on its task, from the task's
    ``base`` and ``teacher`` rows; NaN where the teacher differs from the base model by less than one of
    the ``examples`` scored (|teacher − base| < 1 / examples, up to float rounding: there is no gain to recover)."""
    base = {r["task"]: r for r in rows if r["model"] == "base"}
    teacher = {r["task"]: r["accuracy"] for r in rows if r["model"] == "teacher"}
    for row in rows:
        reference = base[row["task"]]
        value = recovery(row["accuracy"], reference["accuracy"], teacher[row["task"]], reference["examples"])
        row["recovery"] = math.nan if value is None else value
    return rows


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _finite(values) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and split: mean ± std over seeds of the per-seed means over the split's tasks. Recovery
    leaves out the tasks where it is undefined; ``recovery_task_std`` is its spread over tasks (std of
    the per-task recoveries averaged over seeds)."""
    groups: dict[tuple[str, str], dict[int | None, list[dict]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["split"]), {}).setdefault(row["seed"], []).append(row)
    summary = []
    for (model, split), by_seed in groups.items():
        entry = {"model": model, "split": split, "seeds": len(by_seed)}
        for key in MEASURES:
            per_seed = [statistics.fmean(r[key] for r in seed_rows) for seed_rows in by_seed.values()
                        if all(key in r and not math.isnan(r[key]) for r in seed_rows)]
            if per_seed:
                entry[key], entry[key + "_std"] = statistics.fmean(per_seed), _std(per_seed)
        per_seed = [statistics.fmean(v) for v in (_finite(r.get("recovery") for r in seed_rows)
                                                  for seed_rows in by_seed.values()) if v]
        if per_seed:
            per_task: dict[str, list[float]] = {}
            for row in (r for seed_rows in by_seed.values() for r in seed_rows):
                per_task.setdefault(row["task"], []).extend(_finite([row.get("recovery")]))
            entry["recovery"], entry["recovery_std"] = statistics.fmean(per_seed), _std(per_seed)
            entry["recovery_task_std"] = _std([statistics.fmean(v) for v in per_task.values() if v])
        summary.append(entry)
    return summary


def paired_differences(rows: list[dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Per (model, baseline) pair and split: the model's recovery minus the baseline's, per seed (each
    the mean over the split's tasks where both are defined), as mean ± std over the seeds both have;
    ``margin`` = mean / std, how many stds the model is ahead (inf when every seed agrees exactly)."""
    per: dict[tuple[str, str, int], dict[str, float]] = {}  # (model, split, seed) -> task -> recovery
    for row in rows:
        if row["seed"] is not None and row.get("recovery") is not None and not math.isnan(row["recovery"]):
            per.setdefault((row["model"], row["split"], row["seed"]), {})[row["task"]] = row["recovery"]
    out = []
    for model, baseline in pairs:
        for split in SPLITS:
            diffs = []
            for (m, s, seed), tasks in per.items():
                other = per.get((baseline, s, seed))
                common = [t for t in tasks if other and t in other]
                if m == model and s == split and common:
                    diffs.append(statistics.fmean(tasks[t] - other[t] for t in common))
            if diffs:
                mean, std = statistics.fmean(diffs), _std(diffs)
                margin = mean / std if std > 0 else (math.copysign(math.inf, mean) if mean else 0.0)
                out.append({"model": model, "baseline": baseline, "split": split, "seeds": len(diffs),
                            "difference": mean, "std": std, "margin": margin})
    return out


def difference_table(differences: list[dict]) -> str:
    lines = ["| model − baseline | split | seeds | recovery difference | margin (mean / std) |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {d['model']} − {d['baseline']} | {d['split']} | {d['seeds']} | {d['difference']:.2f} ± "
              f"{d['std']:.2f} | {d['margin']:.1f} |" for d in differences]
    return "\n".join(lines)


# markdown_table's columns: (header, summary key, decimals, scale)
COLUMNS = (("accuracy %", "accuracy", 1, 100.0), ("recovery", "recovery", 2, 1.0),
           ("Δ cos to own teacher", "cos_own", 3, 1.0), ("norm ratio", "norm_ratio", 2, 1.0),
           ("specificity", "specificity", 3, 1.0), ("top-1", "top1", 3, 1.0))


def markdown_table(summary: list[dict], split: str = "held-out") -> str:
    """The comparison table of one split: measures per model (mean ± std over seeds)."""

    def cell(entry, key, digits, scale):
        if key not in entry:
            return "–"
        text = f"{entry[key] * scale:.{digits}f}"
        return text + (f" ± {entry[key + '_std'] * scale:.{digits}f}" if entry["seeds"] > 1 else "")

    lines = ["| model | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join([e["model"], *(cell(e, *c[1:]) for c in COLUMNS)]) + " |"
              for e in summary if e["split"] == split]
    return "\n".join(lines)


def task_table(rows: list[dict], split: str = "held-out") -> str:
    """Per model (rows) and task (columns) of one split: accuracy % (recovery), means over seeds."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for row in (r for r in rows if r["split"] == split):
        cells.setdefault(row["model"], {}).setdefault(row["task"], []).append(row)
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["split"] == split))

    def cell(group: list[dict]) -> str:
        recovery = _finite(r.get("recovery") for r in group)
        return (f"{100 * statistics.fmean(r['accuracy'] for r in group):.1f} "
                f"({f'{statistics.fmean(recovery):.2f}' if recovery else '–'})")

    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines += [f"| {model} | " + " | ".join(cell(by_task[t]) if t in by_task else "–" for t in tasks) + " |"
              for model, by_task in cells.items()]
    return "\n".join(lines)


def nearest_table(rows: list[dict], split: str = "held-out") -> str:
    """Per model (rows) and task (columns) of one split: the teacher task nearest to the model's Δ (the most
    frequent over seeds; bold where it is the task itself)."""
    cells: dict[str, dict[str, list[str]]] = {}
    for row in (r for r in rows if r["split"] == split and r.get("nearest")):
        cells.setdefault(row["model"], {}).setdefault(row["task"], []).append(row["nearest"])
    tasks = list(dict.fromkeys(r["task"] for r in rows if r["split"] == split))

    def cell(task: str, nearest: list[str] | None) -> str:
        if not nearest:
            return "–"
        name = most_frequent(nearest)
        return f"**{name}**" if name == task else name

    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {model} | " + " | ".join(cell(t, by_task.get(t)) for t in tasks) + " |"
              for model, by_task in cells.items()]
    return "\n".join(lines)


def split_tables(rows: list[dict], summary: list[dict]) -> str:
    """Both splits' summary tables, each under a line naming its tasks, and what the measures mean."""
    parts = []
    for split, what in SPLITS.items():
        chosen = [r for r in rows if r["split"] == split]
        if chosen:
            tasks = ", ".join(dict.fromkeys(r["task"] for r in chosen))
            parts += [f"{split.capitalize()} tasks ({tasks}), {what}; mean over tasks, {chosen[0]['examples']} "
                      "test examples each:", "", markdown_table(summary, split), ""]
    return "\n".join(parts + [NOTE])


def _json_ready(x):
    """NaN as null, so results.json is standard JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_report(cfg: ComparisonConfig, rows: list[dict], summary: list[dict],
                 diverged: tuple[str, ...] = ()) -> list[Path]:
    """results.json, results.csv, report.md and comparison.png in ``cfg.out_dir``; ``diverged`` names the
    runs (``variant seedK``) that produced a non-finite loss and are missing from the tables."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": to_dict(cfg), "rows": rows, "summary": summary, "diverged": list(diverged)}
    write_text(out / "results.json", json.dumps(_json_ready(results), indent=1, default=str) + "\n")
    keys = ["model", "seed", "task", "split", "accuracy", "cos_own", "cos_others", "specificity", "top1", "nearest",
            "recovery", "norm_ratio"]
    csv = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) for r in rows]
    write_text(out / "results.csv", "\n".join(csv) + "\n")
    undefined = [r["task"] for r in rows if r["model"] == "teacher" and math.isnan(r["recovery"])]
    report = ["# Comparison", "", f"Teachers: `{cfg.teachers}`; held-out tasks: {', '.join(cfg.held_out) or '–'}; "
              f"validation tasks: {', '.join(cfg.validation) or '–'}; "
              f"in-distribution tasks: {', '.join(cfg.eval_in_distribution) or '–'}; "
              f"seeds: {', '.join(map(str, cfg.seeds))}.", "", NOTE, "",
              "Recovery undefined (teacher within one test example of the base model): "
              f"{', '.join(undefined) or 'none'}.", "", "Generators:", ""]
    report += [f"- `{v.name}`: {v.description or 'overrides'} (`{' '.join(v.overrides) or 'defaults'}`)"
               for v in cfg.variants]
    for split, title in (("held-out", "Held-out tasks"), ("in-distribution", "In-distribution tasks"),
                         ("validation", "Validation tasks")):
        if any(r["split"] == split for r in rows):
            report += ["", f"## {title}", "", markdown_table(summary, split), "",
                       "Per task: accuracy % (recovery), mean over seeds.", "", task_table(rows, split), "",
                       ("Nearest teacher: per task, the teacher task nearest to the model's Δ by cosine (most "
                        "frequent over seeds; bold: the task itself)."), "", nearest_table(rows, split)]
    names = [v.name for v in cfg.variants]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[:i] + ([MULTITASK] if cfg.multitask_lora else [])]
    differences = paired_differences(rows, pairs)
    if differences:
        report += ["", "## Differences between models", "",
                   "Recovery of a model minus a baseline's on the same seed (mean over the split's tasks), mean ± "
                   "std over seeds; the margin is the mean over that std.", "", difference_table(differences)]
    if diverged:
        report += ["", f"Diverged (non-finite loss; left out of the tables): {', '.join(diverged)}."]
    write_text(out / "report.md", "\n".join(report) + "\n")
    written = [out / "results.json", out / "results.csv", out / "report.md"]
    png = plot_summary(summary, out / "comparison.png")
    return written + ([png] if png else [])


def plot_summary(summary: list[dict], path: Path) -> Path | None:
    """Bars of recovery per model on held-out and on in-distribution tasks, with std over seeds (None:
    no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..atomic import atomic_path

    models = list(dict.fromkeys(e["model"] for e in summary))
    colours = dict(zip(models, plt.cm.tab10(np.arange(len(models)) % 10)))
    splits = [s for s in SPLITS if any(e["split"] == s for e in summary)] or list(SPLITS)[:2]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 3.8), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits):
        entries = [e for e in summary if e["split"] == split and "recovery" in e]
        if not entries:
            ax.text(0.5, 0.5, "recovery undefined on every task", ha="center", transform=ax.transAxes)
        ax.bar(range(len(entries)), [e["recovery"] for e in entries], yerr=[e["recovery_std"] for e in entries],
               color=[colours[e["model"]] for e in entries], capsize=3)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        ax.set_xticks(range(len(entries)), [e["model"] for e in entries], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{split} recovery (0 = base, 1 = teacher)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def train_comparison(cfg: ComparisonConfig, progress: bool = True):
    """Everything a comparison trains: the generator runs, then (with the evaluator that holds the base
    model) the multitask LoRAs. Returns (runs, evaluator, multitask LoRAs); cached runs are reused."""
    if not cfg.held_out + cfg.validation:
        raise LLGBMError("a comparison needs held-out or validation tasks to evaluate (held_out, validation)")
    runs, multitask = train_runs(cfg, progress)
    return runs, build_evaluator(cfg, progress), multitask


def report_comparison(runs: dict, evaluator: Evaluator, multitask: dict) -> tuple[list[dict], list[dict]]:
    """Evaluate what ``train_comparison`` trained and write the report; returns (rows, summary)."""
    cfg = evaluator.cfg  # in-distribution tasks resolved
    rows = evaluate(cfg, runs, evaluator, multitask)
    summary = summarise(rows)
    diverged = tuple(f"{variant} seed{seed}" for (variant, seed), run in runs.items() if run is None)
    write_report(cfg, rows, summary, diverged)
    return rows, summary


def run_comparison(cfg: ComparisonConfig, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train (or reuse) every run and the multitask LoRAs, evaluate, write the report; returns (rows, summary)."""
    return report_comparison(*train_comparison(cfg, progress))
