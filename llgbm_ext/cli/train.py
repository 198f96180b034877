"""``llgbm train --config FILE.yaml [key=value ...]``: train a generator (standalone, without DnD)."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a prompt-to-LoRA generator on a teacher set")
    p.add_argument("--config", default=None, help="YAML run config (e.g. configs/tiny.yaml); default: built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. loss.mode=delta_only steps=50")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/checkpoints/latest if present")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..training import Trainer, TrainingConfig

    cfg = load_config(TrainingConfig, args.config, args.overrides)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress).setup()
    last = trainer.train()
    trainer.cleanup()
    if trainer.accelerator.is_main_process:
        parts = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("loss", "cos/")))
        print(f"{cfg.out_dir}: {cfg.steps} steps ({cfg.loss.mode}); last step: {parts}")
    return 0
