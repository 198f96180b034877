"""``train_teachers``: teacher adapters for a list of tasks, evaluated against the base model, with their deltas.

1. Load the tasks, the frozen base model, and the LoRA layout derived from the model's config.
2. Train the tasks in groups of ``tasks_per_group`` with ``GroupTrainer`` (K tasks of one objective per forward),
   writing snapshots in both layouts, loss logs, and resumable training state under ``<out>/.state``.
3. Write the manifest; score base and final teacher on each task's test split (``eval.scoring``, the
   prompt format teachers were trained with; the base is a zero adapter in the same forward); store
   the accuracies in the manifest, with a key of what they depend on (``evaluation_key``): a second
   run keeps them where that key is unchanged instead of scoring again.
4. Teacher deltas of every snapshot into the DeltaCache, on the same pristine base model (adapters
   are only ever applied through ``FunctionalLoRA`` hooks, so it is never modified).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_text
from ..data.formatting import PromptFormat
from ..lora.adapters import WEIGHTS_NAME
from ..lora.layout import LoraLayout, layout_from_config
from .batches import EncodedTask, encode_choices, encode_pairs, training_pairs
from .config import TeacherConfig, TeacherError
from .output import (
    adapter_path, append_losses, dnd_file, read_losses, snapshot_loss, truncate_losses, write_initial_adapter, write_train_inputs,
    write_snapshot, write_teacher_manifest,
)
from .tasks import TeacherTask, load_teacher_tasks
from .train import GroupTrainer, learning_rate

STATE_DIR = ".state"
LARGE_HIDDEN = 1536  # from this width on (Qwen2.5-1.5B/7B), DnD's adapters have rank 16


@dataclass
class TeacherReport:
    """What a run did: per-task quality rows (also in the manifest), timings in seconds, where things are."""

    out: Path
    layout: LoraLayout
    rows: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    adapters: int = 0
    deltas: Path | None = None


def teacher_layout(model_dir: Path, config: TeacherConfig) -> LoraLayout:
    """The layout of the model's config with the configured (or DnD's default) rank and alpha."""
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = int(model_config.get("text_config", model_config).get("hidden_size", 0))
    rank = config.rank or (16 if hidden >= LARGE_HIDDEN else 8)
    return layout_from_config(model_config, rank=rank, alpha=config.alpha, targets=config.targets, name=config.base_model)


def prompt_format(config: TeacherConfig) -> PromptFormat:
    return PromptFormat(answer_style=config.style, chat_template=config.chat_template, use_system=config.use_system)


def model_name(base_model: str) -> str:
    """The base model as the manifest names it: a built-in name or hub id as is, a local directory as an absolute path."""
    from ..models.registry import BUILTIN_MODELS

    path = Path(base_model).expanduser()
    return str(path.resolve()) if base_model not in BUILTIN_MODELS and path.is_dir() else base_model


def _check_config(out: Path, config: TeacherConfig) -> None:
    """Refuse to continue a run that was started with other training settings."""
    path = out / STATE_DIR / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(k for k, v in config.training_digest().items() if saved.get(k) != v)
        if changed:
            raise TeacherError(f"{out}: holds a teacher run with other settings (changed: {', '.join(changed)}); "
                               "use another --out, or delete it to start again")
    else:
        write_text(path, json.dumps(config.training_digest(), indent=1) + "\n")


def task_groups(tasks: list[TeacherTask], config: TeacherConfig) -> list[list[TeacherTask]]:
    """Tasks in groups of at most ``tasks_per_group`` trained in one forward, one objective per group (the
    tasks of the run's objective first, then those of each ``task_objectives`` entry's)."""
    by_objective: dict[str, list[TeacherTask]] = {config.objective: []}
    for task in tasks:
        by_objective.setdefault(config.objective_of(task.name), []).append(task)
    size = config.tasks_per_group
    return [same[g : g + size] for same in by_objective.values() for g in range(0, len(same), size)]


def train_group(trainer: GroupTrainer, tasks: list[TeacherTask], out: Path, config: TeacherConfig, name: str,
                progress: bool) -> None:
    """Train one group to the end, continuing from its saved state; snapshots and logs on the way."""
    total = config.total_steps
    snapshot_at = {s: i for i, s in enumerate(config.snapshot_steps())}
    trainer.load_state()
    if trainer.step >= total:  # finished earlier: its snapshots must all be there
        for task in tasks:
            missing = [s for s in snapshot_at if not (out / dnd_file(task, s)).is_file()]
            if missing or not (out / adapter_path(task.name, len(snapshot_at) - 1)).is_dir():
                raise TeacherError(f"{out}: snapshots of {task.name} are missing; delete {trainer.state_dir} to retrain it")
        return
    for task in tasks:
        (out / task.name).mkdir(parents=True, exist_ok=True)
        truncate_losses(out, task.name, trainer.step)
    label = tasks[0].name if len(tasks) == 1 else f"{tasks[0].name} +{len(tasks) - 1}"
    with tqdm(total=total, initial=trainer.step, desc=f"teachers {label}", unit="step", disable=not progress) as bar:
        while trainer.step < total:
            lr = learning_rate(trainer.step, config)
            losses = trainer.train_step().tolist()
            step = trainer.step
            append_losses(out, trainer.names, step, losses, lr)
            if step in snapshot_at:
                for k, task in enumerate(tasks):
                    write_snapshot(out, task, snapshot_at[step], step, trainer.adapter(k), trainer.layout, name)
            if step % config.save_every == 0 or step == total:
                trainer.save_state()
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}")


def evaluate_teachers(model, tokenizer, layout: LoraLayout, tasks: list[TeacherTask], out: Path,
                      config: TeacherConfig, fmt: PromptFormat, answer_tokens: dict[str, int], progress: bool) -> dict[str, dict]:
    """Accuracy of the base model and of each task's final snapshot on its test split, in one pass per task."""
    from ..delta.deltas import load_teacher_factors
    from ..delta.functional import FunctionalLoRA
    from ..eval.scoring import AdapterBatch, ScoringConfig, evaluate_task
    from ..eval.uncertainty import paired_gain_se

    lora = FunctionalLoRA(model, layout)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    quality = {}
    for task in tqdm(tasks, desc="evaluating teachers", unit="task", disable=not progress):
        final = out / adapter_path(task.name, config.snapshots - 1)
        teacher = load_teacher_factors([final], layout, dtype, device)  # (1, L, ...)
        both = {p: (torch.cat([torch.zeros_like(a), a]), torch.cat([torch.zeros_like(b), b])) for p, (a, b) in teacher.items()}
        scoring = ScoringConfig(fmt=fmt, max_length=config.max_length, progress=False,
                                max_new_tokens=min(256, answer_tokens[task.name] + 2))
        base, trained = evaluate_task(model, tokenizer, task.task, scoring, AdapterBatch(lora, both),
                                      labels=["base", "teacher"], limit=config.eval_limit)
        gain_se = (paired_gain_se([e.correct for e in trained.examples], [e.correct for e in base.examples])
                   if trained.total > 1 else None)
        quality[task.name] = {"base_accuracy": base.accuracy, "teacher_accuracy": trained.accuracy, "gain_se": gain_se,
                              "eval_examples": trained.total, "eval_adapter": adapter_path(task.name, config.snapshots - 1)}
    return quality


# what evaluate_teachers adds; gain_se: paired standard error of teacher − base (eval.uncertainty)
SCORES = ("base_accuracy", "teacher_accuracy", "gain_se", "eval_examples", "eval_adapter")


def evaluation_key(model_fingerprint: str, task: TeacherTask, out: Path, config: TeacherConfig, fmt: PromptFormat,
                   answer_tokens: int) -> str:
    """Digest of everything a teacher's scores depend on: the base model's bytes, the final adapter's bytes,
    the scored test examples and the scoring settings (stored with the scores in the manifest)."""
    examples = task.task.test if config.eval_limit is None else task.task.test[: config.eval_limit]
    final = out / adapter_path(task.name, config.snapshots - 1) / WEIGHTS_NAME
    record = {"model": model_fingerprint, "adapter": hashlib.sha256(final.read_bytes()).hexdigest(),
              "examples": [asdict(e) for e in examples], "format": asdict(fmt), "max_length": config.max_length,
              "answer_tokens": answer_tokens, "dtype": config.dtype}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _manifest_scores(out: Path) -> dict[str, dict]:
    """Per task, the scores (and their ``eval_key``) a previous run of ``out`` wrote to its manifest."""
    try:
        tasks = json.loads((out / "manifest.json").read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: info for name, info in tasks.items() if isinstance(info, dict) and "eval_key" in info}


def compute_deltas(model, tokenizer, layout: LoraLayout, tasks: list[TeacherTask], out: Path, config: TeacherConfig,
                   name: str, model_dir: Path, progress: bool) -> Path:
    """Teacher deltas of every snapshot into the DeltaCache (only those it lacks are computed)."""
    from ..delta.cache import DeltaCache
    from ..delta.deltas import DeltaComputer
    from ..delta.probes import get_probe_set
    from ..delta.teacher import cached_teacher_deltas, delta_context

    computer = DeltaComputer(model, tokenizer, layout, get_probe_set(config.probes))
    root = Path(config.delta_cache) if config.delta_cache else out / "deltas"
    paths = [out / adapter_path(t.name, i) for t in tasks for i in range(config.snapshots)]
    labels = [t.name for t in tasks for _ in range(config.snapshots)]
    cached_teacher_deltas(computer, DeltaCache(root), delta_context(computer, name, model_dir), paths, labels,
                          progress=progress)
    return root


def _train_group_process(config: TeacherConfig, model_dir: Path, encoded: list[EncodedTask], group: list[TeacherTask],
                         out: Path, state_dir: Path, name: str) -> None:
    """One group in a worker process of one torch thread (its own copy of the base model)."""
    from ..models.registry import load_base_model

    torch.set_num_threads(1)
    model, _ = load_base_model(model_dir, dtype=config.dtype, device=config.device)
    layout = teacher_layout(model_dir, config)
    train_group(GroupTrainer(model, layout, encoded, config, state_dir), group, out, config, name, False)


def train_teachers(config: TeacherConfig, out_dir: str | Path, progress: bool = True,
                   workers: int = 1) -> TeacherReport:
    """Run (or continue) a teacher run into ``out_dir``; see the module docstring. With ``workers`` > 1
    the groups train in that many processes of one torch thread each (faster than threads on small
    models; a group's adapters are the same either way)."""
    from ..models.registry import load_base_model, resolve_base_model

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TeacherError(f"--out {out}: exists and is not a directory")
    tasks = load_teacher_tasks(config.tasks, config.data_dir, config.max_prompts, with_test=config.eval_limit != 0,
                               validation=config.validation, validation_from=config.validation_from)
    model_dir = resolve_base_model(config.base_model)
    name = model_name(config.base_model)
    layout = teacher_layout(model_dir, config)
    config = replace(config, rank=layout.rank, alpha=layout.alpha)  # resolved, so the digest names them
    _check_config(out, config)
    model, tokenizer = load_base_model(model_dir, dtype=config.dtype, device=config.device)
    fmt = prompt_format(config)
    report = TeacherReport(out=out, layout=layout)

    write_initial_adapter(out, layout, config, name)
    previous = _manifest_scores(out)  # read before the manifest is rewritten below
    start = time.perf_counter()
    answer_tokens: dict[str, int] = {}
    quality: dict[str, dict] = {}
    groups = []  # (tasks, their encoded training sequences, state directory)
    for group in task_groups(tasks, config):
        encoded: list[EncodedTask] = []
        for t in group:
            contexts, targets, skipped = training_pairs(t.task, fmt, tokenizer)  # also the KL signal's inputs
            if config.objective_of(t.name) != "lm":
                e = encode_choices(t.task, tokenizer, fmt, config.max_length, tokenizer.pad_token_id)
            else:
                e = encode_pairs(t.name, contexts, targets, tokenizer, fmt, config.max_length, tokenizer.pad_token_id,
                                 skipped)
            encoded.append(e)
            answer_tokens[t.name] = int(e.num_target.max())
            quality[t.name] = {"train_used": len(e), "train_skipped": e.skipped,
                               "train_inputs": write_train_inputs(out, t, contexts, targets, fmt)}
        groups.append((group, encoded, out / STATE_DIR / f"group_{len(groups):03d}"))
    if workers > 1 and len(groups) > 1:
        import concurrent.futures

        from ..workers import worker_pool

        with worker_pool(min(workers, len(groups))) as pool, \
                tqdm(total=len(groups), desc=f"teachers ({min(workers, len(groups))} processes)", unit="group",
                     disable=not progress) as bar:
            futures = [pool.submit(_train_group_process, config, model_dir, encoded, group, out, state, name)
                       for group, encoded, state in groups]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
    else:
        for group, encoded, state in groups:
            train_group(GroupTrainer(model, layout, encoded, config, state), group, out, config, name, progress)
    report.seconds["train"] = time.perf_counter() - start
    for t in tasks:
        records = read_losses(out, t.name)
        quality[t.name]["first_loss"] = snapshot_loss(records, config.snapshot_every, config.snapshot_every)
        quality[t.name]["final_loss"] = snapshot_loss(records, config.total_steps, config.snapshot_every)
    report.adapters = len(tasks) * config.snapshots
    write_teacher_manifest(out, name, layout, tasks, config, fmt, quality)

    if config.eval_limit != 0:  # scores of a previous run are kept where nothing they depend on changed
        from ..delta.cache import model_fingerprint

        start = time.perf_counter()
        fingerprint = model_fingerprint(model_dir)
        keys = {t.name: evaluation_key(fingerprint, t, out, config, fmt, answer_tokens[t.name]) for t in tasks}
        todo = [t for t in tasks if previous.get(t.name, {}).get("eval_key") != keys[t.name]
                or any(k not in previous[t.name] for k in SCORES)]  # scored before gain_se was recorded
        scores = (evaluate_teachers(model, tokenizer, layout, todo, out, config, fmt, answer_tokens, progress)
                  if todo else {})
        for t in tasks:
            numbers = scores.get(t.name) or {k: previous[t.name][k] for k in SCORES}
            quality[t.name].update(numbers, eval_key=keys[t.name])
        write_teacher_manifest(out, name, layout, tasks, config, fmt, quality)
        report.seconds["eval"] = time.perf_counter() - start
    if config.probes:
        start = time.perf_counter()
        report.deltas = compute_deltas(model, tokenizer, layout, tasks, out, config, name, model_dir, progress)
        report.seconds["deltas"] = time.perf_counter() - start
    report.rows = [{"task": t.name, "kind": t.task.kind, **quality[t.name], **({"scored": t.scored} if t.scored != "test" else {})}
                   for t in tasks]
    return report
