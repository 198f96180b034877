"""``llgbm teachers``: train teacher LoRAs per task (K tasks per forward), snapshot their trajectories in
DnD's and PEFT's layouts, score base vs teacher, and cache the teacher deltas.

A killed run continues where it stopped when started again with the same arguments and ``--out``.
"""

from __future__ import annotations

import argparse

from .arguments import non_negative_int, positive_int

from ..lora.layout import PROJECTIONS


def register(sub, common: argparse.ArgumentParser) -> None:
    from ..teachers.config import OBJECTIVES, QUICK, VALIDATION_FROM, TeacherConfig

    d = TeacherConfig(base_model="", tasks=("x",))  # defaults, shown in --help
    p = sub.add_parser("teachers", parents=[common], help="train teacher LoRA adapters (snapshots of one trajectory per task)")
    p.add_argument("--base-model", required=True, help="'tiny', 'smollm2-135m', a model directory or a cached hub id")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", metavar="DIR", help="directory of DnD task files (e.g. from `llgbm data export`)")
    source.add_argument("--synthetic", action="store_true", help="tasks of the embedded synthetic suite")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="arc_e arc_c boolq gsm8k hellaswag obqa piqa winogrande (with --data-dir); synthetic: "
                        "task names (word_food), family names (word = all its members), v1, v2, v3 (a suite) or all (suite v3)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (continued if it holds an unfinished run)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-rank", type=positive_int, help="rank (default 8; 16 for models of hidden size >= 1536)")
    lora.add_argument("--lora-alpha", type=float, help="alpha (default 2 x rank, as DnD)")
    lora.add_argument("--targets", nargs="+", choices=PROJECTIONS, default=list(PROJECTIONS), metavar="PROJ",
                      help="adapted projections (default all seven)")
    text = p.add_argument_group("text format (evaluation uses the same)")
    text.add_argument("--format", choices=["cloze", "option", "letter"],
                      help="answer style: default option for the synthetic suite, cloze for real tasks")
    text.add_argument("--objective", choices=list(OBJECTIVES), default=d.objective,
                      help="lm: cross-entropy on the gold answer (default); choice: cross-entropy over the options' "
                           "scores, as evaluation decides (multiple-choice tasks only); lm+choice: their sum")
    text.add_argument("--task-objective", nargs="+", default=[], metavar="TASK=OBJECTIVE",
                      help="another objective for some tasks, e.g. obqa=choice (a family name sets all its members)")
    text.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    text.add_argument("--use-system", action="store_true", help="include the records' system prompts (chat template only)")
    text.add_argument("--max-length", type=positive_int, default=d.max_length, help=f"tokens per sequence (default {d.max_length})")
    budget = p.add_argument_group("budget")
    budget.add_argument("--warmup-steps", type=non_negative_int, help=f"steps before the first snapshot (default {d.warmup_steps})")
    budget.add_argument("--snapshot-every", type=positive_int, help=f"steps between snapshots (default {d.snapshot_every})")
    budget.add_argument("--snapshots", type=positive_int, help=f"snapshots per task (default {d.snapshots})")
    budget.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"sequences per task and step (default {d.batch_size})")
    budget.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    budget.add_argument("--lr-warmup", type=non_negative_int, default=d.lr_warmup, help=f"learning-rate warm-up steps (default {d.lr_warmup})")
    budget.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay (default {d.weight_decay})")
    budget.add_argument("--tasks-per-group", type=positive_int, default=d.tasks_per_group,
                        help=f"tasks trained together in one forward (default {d.tasks_per_group})")
    budget.add_argument("--save-every", type=positive_int, default=d.save_every, help=f"steps between resume points (default {d.save_every})")
    budget.add_argument("--seed", type=int, default=d.seed)
    budget.add_argument("--init", choices=["shared", "per-task"], default=d.init,
                        help="shared: every task's LoRA starts from one initialisation (default, as DnD collects its "
                             "checkpoints under one seed); per-task: each task draws its own")
    budget.add_argument("--quick", action="store_true",
                        help="CI smoke budget: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    after = p.add_argument_group("evaluation and deltas")
    after.add_argument("--eval-limit", type=non_negative_int,
                       help=f"test examples scored per task (default {d.eval_limit}; 0: no evaluation)")
    after.add_argument("--validation", type=non_negative_int, default=d.validation, metavar="N",
                       help="hold N training examples per task out of training and score them instead of the test "
                            "split (choosing settings without looking at test; default 0)")
    after.add_argument("--validation-from", choices=list(VALIDATION_FROM), default=d.validation_from,
                       help="train: N held out of each training split (default); dataset: the first N of the data "
                            "set's own validation split where it has one (ARC-e, ARC-c, OBQA), a train slice elsewhere")
    after.add_argument("--max-prompts", type=positive_int, default=d.max_prompts,
                       help=f"condition prompts kept per real task (default {d.max_prompts})")
    after.add_argument("--probes", default=d.probes, help="probe set of the teacher deltas (generic, domain:math, a JSON file)")
    after.add_argument("--no-deltas", action="store_true", help="do not compute teacher deltas")
    after.add_argument("--delta-cache", metavar="DIR", help="DeltaCache directory (default <out>/deltas)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base model dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes of one thread each that train the task groups (--tasks-per-group) side by side")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _budget(args, name: str, quick: dict, default):
    """An explicit argument, else the --quick value, else the default."""
    value = getattr(args, name)
    if value is not None:
        return value
    return quick.get(name, default) if args.quick else default


def config_from_args(args):
    """The TeacherConfig of the command line."""
    import torch

    from ..errors import LLGBMError
    from ..teachers.config import QUICK, TeacherConfig
    from ..teachers.tasks import expand_task_names

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise LLGBMError(f"--device {device}: CUDA is not available")
    d = TeacherConfig(base_model="", tasks=("x",))
    return TeacherConfig(
        base_model=args.base_model, tasks=tuple(expand_task_names(args.tasks, args.data_dir)), data_dir=args.data_dir,
        rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.targets), answer_style=args.format,
        objective=args.objective, task_objectives=task_objectives(args.task_objective, args.data_dir),
        chat_template=args.chat_template, use_system=args.use_system,
        max_length=args.max_length,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, lr_warmup=args.lr_warmup,
        warmup_steps=_budget(args, "warmup_steps", QUICK, d.warmup_steps),
        snapshot_every=_budget(args, "snapshot_every", QUICK, d.snapshot_every),
        snapshots=_budget(args, "snapshots", QUICK, d.snapshots),
        tasks_per_group=args.tasks_per_group, save_every=args.save_every, seed=args.seed, init=args.init, max_prompts=args.max_prompts,
        eval_limit=_budget(args, "eval_limit", QUICK, d.eval_limit), validation=args.validation,
        validation_from=args.validation_from,
        probes=None if args.no_deltas else args.probes, delta_cache=args.delta_cache, dtype=args.dtype, device=device,
    )


def task_objectives(entries: list[str], data_dir: str | None) -> tuple[str, ...]:
    """``--task-objective`` entries with their task names expanded as ``--tasks`` expands them."""
    from ..errors import LLGBMError
    from ..teachers.tasks import expand_task_names

    out = []
    for entry in entries:
        task, sep, objective = entry.partition("=")
        if not sep:
            raise LLGBMError(f"--task-objective {entry}: write TASK=OBJECTIVE, e.g. obqa=choice")
        out += [f"{name}={objective}" for name in expand_task_names([task], data_dir)]
    return tuple(out)


def _se(row: dict) -> str:
    se = row.get("gain_se")
    return f"{se:6.1%}" if se is not None else f"{'-':>6s}"


def clearly_better(row: dict) -> bool:
    """The teacher's gain over the base model is more than twice its paired standard error."""
    se = row.get("gain_se")
    return se is not None and row["teacher_accuracy"] - row["base_accuracy"] > 2 * se


def format_table(rows: list[dict]) -> str:
    """Base vs teacher accuracy, the gain ± its paired SE, and the loss at the first and the last snapshot,
    one line per task."""
    lines = [f"{'task':16s} {'kind':5s} {'base':>6s} {'teacher':>7s} {'gain':>6s} {'± SE':>6s} {'n':>4s} "
             f"{'loss first':>10s} {'final':>6s}"]
    for r in rows:
        base, teacher = r.get("base_accuracy"), r.get("teacher_accuracy")
        scored = base is not None
        lines.append(
            f"{r['task']:16s} {r['kind']:5s} "
            + (f"{base:6.1%} {teacher:7.1%} {teacher - base:+6.1%} {_se(r)} {r['eval_examples']:4d} " if scored
               else f"{'-':>6s} {'-':>7s} {'-':>6s} {'-':>6s} {'-':>4s} ")
            + f"{r['first_loss']:10.3f} {r['final_loss']:6.3f}"
        )
    scored = [r for r in rows if r.get("base_accuracy") is not None]
    if len(scored) > 1:
        mean = lambda key: sum(r[key] for r in scored) / len(scored)  # noqa: E731
        wins = sum(r["teacher_accuracy"] > r["base_accuracy"] for r in scored)
        clear = sum(clearly_better(r) for r in scored)
        lines.append(f"{'mean':16s} {'':5s} {mean('base_accuracy'):6.1%} {mean('teacher_accuracy'):7.1%} "
                     f"{mean('teacher_accuracy') - mean('base_accuracy'):+6.1%}   teacher better on {wins}/{len(scored)} "
                     f"tasks, by more than 2 SE on {clear}")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from ..teachers.pipeline import train_teachers

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    report = train_teachers(config, args.out, progress=not args.no_progress, workers=args.workers)
    layout = report.layout
    print(f"{args.out}: {report.adapters} adapters of {len(config.tasks)} tasks on {config.base_model} "
          f"(rank {layout.rank}, alpha {layout.alpha:g}, {config.total_steps} steps each, format {config.style}"
          f"{' + chat template' if config.chat_template else ''}, objective {config.objective}"
          + "".join(f", {entry}" for entry in config.task_objectives) + ")")
    if config.validation:
        scored = {row["task"]: row.get("scored", "test") for row in report.rows}
        own = [t for t, s in scored.items() if s == "validation split"]
        print(f"scored on {config.validation} validation examples per task, not the test split: "
              + (f"the data set's own validation split ({', '.join(own)}), " if own else "")
              + "held out of the training split" + (" elsewhere" if own else ""))
    print(format_table(report.rows))
    times = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    print(f"time: {times}; threads {torch.get_num_threads()}" + (f"; deltas in {report.deltas}" if report.deltas else ""))
    return 0
