"""``llgbm generate --generator RUN (--prompts FILE | --task NAME) --out DIR``: adapters from prompts."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], help="generate LoRA adapters for tasks with a trained generator")
    p.add_argument("--generator", required=True, help="training run folder (latest checkpoint) or one checkpoint folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", nargs="+", help="JSON files: a list of prompts, {'task', 'prompts'}, or DnD records")
    source.add_argument("--task", nargs="+", help="task names: from the run's teacher set, or the synthetic suite")
    p.add_argument("--out", required=True, help="output folder: <task>/ PEFT adapters and dnd/<task>/<s>.safetensors")
    p.add_argument("--samples", type=int, default=1, help="adapters per task, each from another draw of prompts")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of condition prompts")
    p.set_defaults(func=run)


def task_prompts(name: str, teachers_dir: str) -> list[str]:
    """Condition prompts of a task: from the teacher manifest if it lists the task, else the synthetic suite."""
    from pathlib import Path

    from ..data.teacher_set import load_teacher_set
    from ..errors import LLGBMError

    if (Path(teachers_dir) / "manifest.json").is_file():
        teachers = load_teacher_set(teachers_dir)
        if name in teachers.tasks:
            return teachers.prompts(name)
    from ..data.synthetic import get_synthetic_task

    try:
        return get_synthetic_task(name).conditions
    except LLGBMError:
        raise LLGBMError(f"task {name!r}: not in {teachers_dir}/manifest.json nor in the synthetic suite") from None


def run(args) -> int:
    from ..training.generate import load_trained_generator, read_prompts, write_generated

    trained = load_trained_generator(args.generator)
    if args.prompts:
        named = dict(read_prompts(p) for p in args.prompts)
    else:
        named = {t: task_prompts(t, trained.config.data.teachers) for t in args.task}
    written = write_generated(trained, named, args.out, samples=args.samples, seed=args.seed)
    for path in written:
        print(path)
    return 0
