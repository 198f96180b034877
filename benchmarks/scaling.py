"""Benchmark: a generator training step on 1 and on 2 processes (DDP), side by side.

    python benchmarks/scaling.py [--processes 1 2] [--steps N] [--warmup N] [--batch-size B]
                                 [--threads T] [key=value ...]

For each process count P, ``accelerate launch --config_file configs/accelerate/ddp.yaml
--num_processes P`` runs this file as a worker: the standalone ``Trainer`` on a teacher set of random
``tiny``-layout adapters written to a temporary folder (nothing is downloaded), ``--steps`` steps of
the same global batch B, of which each process takes B/P. On a machine without CUDA the processes
are CPU processes joined over gloo, each with ``--threads`` torch threads (default 1, so P processes
use P cores). Defaults: multitask loss (weight + delta), the simple generator, the tiny model as text
encoder; ``key=value`` arguments override the run config as for ``llgbm train``.

Reported per P, from the steps after ``--warmup``:
  * step time: median ``step_time`` of metrics.jsonl (forward, backward, gradient all-reduce, optimizer);
  * probe tokens/s: base-model tokens of the delta path per second (B x probes x padded probe
    length per step; the step's dominant cost) and adapters/s (B per step);
  * peak memory per process: peak RSS (``ru_maxrss``; with CUDA also ``max_memory_allocated``).
The last two lines are machine-readable: ``throughput_ratio=X`` (tokens/s at the largest P over
tokens/s at 1) and ``peak_memory_ratio=Y`` (peak memory per process, same order).

On CPU this measures the code path, not GPU efficiency: two single-threaded processes on a 2-core
machine share memory bandwidth and caches, and gloo all-reduces through local TCP, so expect about
1.5-1.9x, lower on a machine busy with other work. Each process holds its own copy of the frozen base
model and of the generator, so peak memory per process falls only by the activations of the half
batch it no longer holds (measured ratio about 0.8 at the defaults; closer to 1 for larger models).

Expected scaling on GPUs (DDP, one process per GPU; estimates from the sizes involved, not
measured here): the only per-step communication is one all-reduce of the generator's gradients,
which DDP overlaps with the backward pass. For DnD's 1.1 B-parameter Qwen2.5-0.5B generator in bf16
that is about 2.2 GB per step, some 15-30 ms over NVLink against seconds of compute for a few
teachers per GPU, so throughput should grow almost linearly with the GPU count (90 % or more of
ideal) while every GPU keeps at least 2-4 teachers per step; with fewer, fixed per-step costs
(optimizer step on every rank, kernel launches) dominate. Between nodes (12-50 GB/s) the same
all-reduce takes 0.05-0.2 s, so keep the per-GPU batch larger there. Memory per GPU under DDP is the
frozen base model (0.5B in bf16: about 1 GB), the generator with its gradients and Adam state
(1.1 B parameters: about 18 GB in fp32) and the activations of B/P x probes sequences; ZeRO-2
divides the gradients and Adam state (about 13 GB of the 18) by P, ZeRO-3 the parameters too.

Run time on 2 CPU cores (1 thread per process): about 1 min with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = ["encoder.kind=base-model", "encoder.model=tiny", "generator.kind=simple", "generator.embed_dim=128",
       "loss.mode=multitask", "optim.warmup_steps=2", "save_every=1000000", "loss.noise=0"]


def write_teachers(root: Path, tasks: int = 4, per_task: int = 4, layout=None, model_name: str = "tiny") -> Path:
    """Random adapters (``layout``, default tiny's) with condition prompts: a teacher set for timing, not for
    learning."""
    import torch

    from llgbm_ext.data.teacher_set import write_manifest
    from llgbm_ext.lora.adapters import save_peft_adapter
    from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
    from llgbm_ext.lora.layout import get_layout

    layout = layout or get_layout("tiny")
    generator = torch.Generator().manual_seed(0)
    adapters, info = [], {}
    for t in range(tasks):
        task = f"task_{t}"
        for i in range(per_task):
            state = state_dict_from_factors(random_factors(layout, generator=generator, std=0.05), layout)
            save_peft_adapter(state, root / task / f"{i:03d}", layout, base_model_name_or_path=model_name)
            adapters.append({"name": f"{task}_{i:03d}", "task": task, "path": f"{task}/{i:03d}", "step": i})
        info[task] = {"kind": "exact", "family": "bench", "prompts": [f"task {t}: {n} then {n * t}" for n in range(32)]}
    write_manifest(root, model_name, layout, info, adapters)
    return root


def worker(out: Path, overrides: list[str]) -> None:
    """One process of a launched run: train, then record this process's peak memory and tokens per step."""
    import torch

    from llgbm_ext.config import load_config
    from llgbm_ext.training import Trainer, TrainingConfig

    cfg = load_config(TrainingConfig, None, [f"out_dir={out}", *overrides])
    trainer = Trainer(cfg, progress=False).setup()
    trainer.train()
    acc = trainer.accelerator
    delta = trainer.signals.get("delta") if cfg.loss.uses_delta else None
    probe_tokens = delta.computer.input_ids[0].numel() if delta else 0  # probes x length of one adapter
    record = {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "tokens_per_step": probe_tokens * cfg.batch_size,
        "device": str(acc.device),
        "processes": acc.num_processes,
    }
    (out / f"process_{acc.process_index}.json").write_text(json.dumps(record) + "\n")
    trainer.cleanup()


def launch(processes: int, out: Path, overrides: list[str], threads: int) -> dict:
    """Run P processes through accelerate and summarise their records and metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(REPO_ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
           "--num_cpu_threads_per_process", str(threads), str(Path(__file__).resolve()), "--worker", str(out), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    records = [json.loads((out / f"process_{r}.json").read_text()) for r in range(processes)]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (teachers per step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.overrides)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    rows = {}
    with tempfile.TemporaryDirectory(prefix="llgbm-scaling-") as tmp:
        teachers = write_teachers(Path(tmp) / "teachers")
        base = [*RUN, f"data.teachers={teachers}", f"steps={args.steps}", f"batch_size={args.batch_size}", *args.overrides]
        for p in args.processes:
            result = launch(p, Path(tmp) / f"run_{p}", base, args.threads)
            step = statistics.median(r["step_time"] for r in result["steps"][args.warmup:])
            rec = result["records"]
            peak = max(r["cuda_peak_mib"] or r["peak_rss_mib"] for r in rec)
            rows[p] = {"step_s": step, "tokens_s": rec[0]["tokens_per_step"] / step, "adapters_s": args.batch_size / step,
                       "peak_mib": peak, "device": rec[0]["device"]}

    memory = "CUDA max allocated" if rows[args.processes[0]]["device"].startswith("cuda") else "peak RSS"
    print(f"global batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up), {args.threads} thread(s) per process")
    print(f"{'processes':>9s} {'step s':>8s} {'probe tokens/s':>15s} {'adapters/s':>11s} {memory + ' MiB/process':>24s}")
    for p, r in rows.items():
        print(f"{p:9d} {r['step_s']:8.3f} {r['tokens_s']:15.0f} {r['adapters_s']:11.2f} {r['peak_mib']:24.0f}")
    first, last = rows[args.processes[0]], rows[args.processes[-1]]
    throughput = last["adapters_s"] / first["adapters_s"]
    print(f"throughput_ratio={throughput:.2f}")
    print(f"peak_memory_ratio={last['peak_mib'] / first['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
