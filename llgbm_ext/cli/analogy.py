"""``llgbm analogy``: score affine combinations of teacher adapters on a task (eval/analogy.py)."""

from __future__ import annotations

from ..errors import LLGBMError
from .arguments import positive_int


def register(sub, common) -> None:
    p = sub.add_parser("analogy", parents=[common],
                       help="can a task's adapter be written from its siblings' teachers? (translation vs reflection)")
    p.add_argument("--teachers", required=True, metavar="DIR", help="teacher directory (llgbm teachers / demo)")
    p.add_argument("--target", required=True, metavar="TASK", help="the task scored, e.g. word_not_food")
    p.add_argument("--source", required=True, metavar="TASK",
                   help="the task the relation is applied to, e.g. word_food")
    p.add_argument("--pairs", required=True, nargs="+", metavar="A:B",
                   help="training pairs of the relation, e.g. word_colour:word_not_colour word_body:word_not_body")
    p.add_argument("--data-dir", metavar="DIR", help="DnD task files, for tasks that are not synthetic")
    p.add_argument("--limit", type=positive_int, metavar="N", help="score the first N test examples (default all)")
    p.add_argument("--out", metavar="FILE", help="also write the rows as JSON")
    p.set_defaults(func=run)


def parse_pairs(texts: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for text in texts:
        a, sep, b = text.partition(":")
        if not (sep and a and b) or ":" in b:
            raise LLGBMError(f"--pairs: {text!r} is not A:B (two task names)")
        pairs.append((a, b))
    return pairs


def run(args) -> int:
    import json

    from ..atomic import write_text
    from ..data.teacher_set import load_teacher_set
    from ..eval.analogy import analogy_table, score_analogies

    pairs = parse_pairs(args.pairs)
    teachers = load_teacher_set(args.teachers)
    rows = score_analogies(teachers, args.target, args.source, pairs, data_dir=args.data_dir, limit=args.limit)
    print(f"{args.target}: adapters written from teachers of {args.source} and {len(pairs)} pair(s)\n")
    print(analogy_table(rows))
    if args.out:
        write_text(args.out, json.dumps(rows, indent=1, default=str) + "\n")
    return 0
