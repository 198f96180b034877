"""Benchmark: a multitask-LoRA step in one forward vs in length-sorted chunks, side by side.

    python benchmarks/multitask.py [--steps N] [--chunks 1 2 3] [--threads N]

The default demo's multitask LoRA: the tiny model, one sequence of each of suite v3's 49 training tasks per
step (lm objective), the teachers' rank and targets. ``MixtureTrainer`` runs a step's sequences sorted by
length in ``LM_CHUNKS`` forwards, each padded to its own longest; this times full training steps (forward,
backward, AdamW) with each chunk count in turn, round by round on the same machine, and prints the tokens
a step runs (padding included) and the median step time. The last line is machine-readable:
    chunked_vs_one_step_ratio=X   (median step time with the most chunks given / with the first)

Run time on 2 CPU cores: about 30 seconds with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llgbm_ext.data.formatting import PromptFormat  # noqa: E402
from llgbm_ext.data.synthetic import SUITES, held_out_tasks, validation_tasks  # noqa: E402
from llgbm_ext.models.registry import load_base_model, resolve_base_model  # noqa: E402
from llgbm_ext.teachers import multitask  # noqa: E402
from llgbm_ext.teachers.batches import encode_task  # noqa: E402
from llgbm_ext.teachers.config import TeacherConfig  # noqa: E402
from llgbm_ext.teachers.pipeline import teacher_layout  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per chunk count and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's workers use one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    left_out = set(held_out_tasks(3) + validation_tasks(3))
    tasks = [t for t in SUITES[3] if t not in left_out]
    model_dir = resolve_base_model("tiny")
    model, tokenizer = load_base_model(model_dir)
    config = TeacherConfig(base_model="tiny", tasks=tuple(tasks), batch_size=1, warmup_steps=0, snapshot_every=10**6,
                           snapshots=1, eval_limit=0, probes=None)
    layout = teacher_layout(model_dir, config)
    encoded = [encode_task(multitask.training_task(t, None), tokenizer, PromptFormat(), config.max_length,
                           tokenizer.pad_token_id) for t in tasks]
    state = Path(tempfile.gettempdir()) / "llgbm-benchmark-multitask"  # never written: the trainers do not save
    trainers = {c: multitask.MixtureTrainer(model, layout, encoded, config, state / str(c)) for c in args.chunks}
    lengths = trainers[args.chunks[0]].tasks[0].lengths
    print(f"{len(tasks)} tasks, one sequence each per step; {args.rounds} rounds of {args.steps} steps per chunk count")
    times: dict[int, list[float]] = {c: [] for c in args.chunks}
    for _ in range(args.rounds):
        for chunks, trainer in trainers.items():
            multitask.LM_CHUNKS = chunks
            trainer.train_step()  # warm-up
            for _ in range(args.steps):
                started = time.perf_counter()
                trainer.train_step()
                times[chunks].append(time.perf_counter() - started)
    for chunks, trainer in trainers.items():
        indices = trainer.indices(trainer.parts["lm"], 0)
        order = lengths[torch.from_numpy(indices)].sort().values
        padded = sum(int(part.max()) * len(part) for part in order.tensor_split(min(chunks, len(order))))
        print(f"chunks={chunks}: {padded} tokens a step (step 0; {int(order.sum())} without padding), "
              f"median step {statistics.median(times[chunks]) * 1e3:.1f} ms")
    first, last = args.chunks[0], args.chunks[-1]
    print(f"chunked_vs_one_step_ratio={statistics.median(times[last]) / statistics.median(times[first]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
