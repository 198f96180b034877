"""``llgbm ablate --config FILE [key=value ...]``: variants × seeds on one teacher set, mean ± std, on held-out
and in-distribution tasks, next to the base model, the teachers and the multitask LoRA baseline."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("ablate", parents=[common], help="compare generator variants (modes, λ, N, probes) over seeds")
    p.add_argument("--config", required=True, help="comparison config (YAML), e.g. configs/ablations/llgbm-original.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. seeds=[0,1] eval_limit=32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..errors import LLGBMError
    from ..experiments.comparison import ComparisonConfig, run_comparison, split_tables

    cfg = load_config(ComparisonConfig, args.config, args.overrides)
    if not (Path(cfg.teachers) / "manifest.json").is_file():
        raise LLGBMError(f"{cfg.teachers}: no teacher set; create it first (`llgbm demo` writes runs/demo/teachers, "
                         "`llgbm demo --v1` runs/demo-v1/teachers, or `llgbm teachers ... --out DIR`)")
    rows, summary = run_comparison(cfg, progress=not args.no_progress)
    print(split_tables(rows, summary))
    print(f"\n{cfg.out_dir}: results.csv, results.json, report.md, comparison.png")
    return 0
