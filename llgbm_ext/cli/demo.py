"""``llgbm demo [--quick | --real [--hold-out TASK] | --v1 | --v2] [--task-objective TASK=OBJECTIVE ...]``: the
README's main job (experiments/demo.py), with a printed comparison."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import LLGBMError
from .arguments import positive_int


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common],
                       help="teachers, weight-only vs LLGBM generators, held-out evaluation (embedded default)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller budgets (about 3 minutes; a smoke test)")
    size.add_argument("--real", action="store_true",
                      help="SmolLM2-135M and the offline commonsense sets, one task held out (--hold-out, "
                           "default ARC-e; under an hour on 2 cores)")
    size.add_argument("--v1", action="store_true",
                      help="the earlier default on synthetic suite v1 (13 tasks), to reproduce earlier results")
    size.add_argument("--v2", action="store_true",
                      help="the default's budgets on synthetic suite v2 (49 tasks: v3 without the ten 'none' "
                           "negations), the previous default's suite")
    p.add_argument("--hold-out", metavar="TASK",
                   help="with --real: the task left out of generator training and evaluated on 200 test examples: "
                        "arc_e (default), arc_c, boolq, obqa or piqa")
    p.add_argument("--task-objective", nargs="+", default=[], metavar="TASK=OBJECTIVE",
                   help="train these tasks' teachers with another objective (lm, choice, lm+choice), e.g. "
                        "obqa=lm (over the plan's own: --real trains ARC-c and OBQA on choice); the default output "
                        "folder gets the entries as a suffix")
    p.add_argument("--out", help="output folder (default runs/demo, runs/demo-quick, runs/demo-real, "
                                 "runs/demo-real-TASK for another --hold-out, runs/demo-v1 or runs/demo-v2)")
    p.add_argument("--seed", type=int, default=0, help="seed of teachers and generators (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads of this process (default: torch's choice)")
    p.add_argument("--workers", type=positive_int, help="processes that train teachers and generators, one thread "
                                               "each (default: the CPU cores available, at most the runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def teacher_table(rows: list[dict], held_out: tuple[str, ...], validation: tuple[str, ...] = ()) -> str:
    """Base vs teacher accuracy per task, with the gain's paired SE (held-out and validation tasks marked)."""
    lines = ["| task | base % | teacher % | gain ± paired SE |", "|---|---:|---:|---:|"]
    for row in rows:
        if "teacher_accuracy" in row:
            mark = " (held out)" if row["task"] in held_out else " (validation)" if row["task"] in validation else ""
            base, teacher = 100 * row["base_accuracy"], 100 * row["teacher_accuracy"]
            se = row.get("gain_se")
            gain = f"{teacher - base:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
            lines.append(f"| {row['task']}{mark} | {base:.1f} | {teacher:.1f} | {gain} |")
    return "\n".join(lines)


def plan_and_out(args):
    """The plan the arguments choose and its output folder (``--hold-out`` only with ``--real``)."""
    from ..experiments.demo import PLANS, real_plan

    if args.hold_out is not None and not args.real:
        raise LLGBMError("--hold-out needs --real (the other demos have fixed held-out tasks)")
    name = "real" if args.real else "quick" if args.quick else "v1" if args.v1 else "v2" if args.v2 else "default"
    plan = real_plan(args.hold_out or "arc_e") if args.real else PLANS[name]
    real = "runs/demo-real" if plan.held_out == ("arc_e",) else f"runs/demo-real-{plan.held_out[0]}"
    out = args.out or {"default": "runs/demo", "quick": "runs/demo-quick", "real": real, "v1": "runs/demo-v1",
                       "v2": "runs/demo-v2"}[name]
    if args.task_objective:
        from ..teachers.config import TeacherConfig
        from .teachers import task_objectives

        entries = task_objectives(args.task_objective, str(Path(out) / "data") if plan.real_data else None)
        TeacherConfig(base_model=plan.base_model, tasks=plan.tasks, task_objectives=entries)  # one-line errors now
        merged = dict(e.partition("=")[::2] for e in plan.teacher.get("task_objectives", ()) + entries)  # ours win
        plan = replace(plan, teacher=dict(plan.teacher, task_objectives=tuple(f"{t}={o}" for t, o in merged.items())))
        if not args.out:
            out += "-" + "-".join(entry.replace("=", "-").replace("+", "") for entry in entries)
    return plan, out


def run(args) -> int:
    import os

    import torch

    from ..eval.uncertainty import ERROR_NOTE, error_table
    from ..experiments.comparison import MULTITASK, difference_table, paired_differences, split_tables
    from ..experiments.demo import run_demo

    plan, out = plan_and_out(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers or min(len(os.sched_getaffinity(0)), 2 * plan.seeds)
    result = run_demo(plan, out, seed=args.seed, progress=not args.no_progress, workers=workers)
    print("\nTeachers (test accuracy, the format they were trained in):\n")
    print(teacher_table(result.teacher_rows, plan.held_out, plan.validation))
    print()
    print(f"LLGBM here is: {plan.llgbm.description}.\n")
    print(split_tables(result.rows, result.summary))
    baselines = [b for b in ("weight_only", MULTITASK) if any(r["model"] == b for r in result.rows)]
    differences = paired_differences(result.rows, [(plan.llgbm.name, b) for b in baselines])
    if differences:
        print("\nLLGBM against the baselines: recovery difference on the same seed, mean ± std over seeds.\n")
        print(difference_table(differences))
    print(f"\nHeld-out tasks with their sampling error. {ERROR_NOTE}\n")
    print(error_table(result.rows))
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.seconds.items())
    print(f"\ntime: {times} (total {sum(result.seconds.values()) / 60:.1f} min)")
    print(f"report: {result.out / 'report.md'}, {result.out / 'results.csv'}, {result.out / 'comparison.png'}")
    return 0
