"""Benchmark: a generator training step with the delta term vs the weight-only step, side by side.

    python benchmarks/train.py [--device cpu|cuda] [--geometry tiny|qwen2.5-0.5b|qwen2.5-1.5b] [--layers N]
                               [--dtype fp32|bf16] [--steps N] [--warmup N] [--teachers N] [--out DIR]
                               [key=value ...]

Writes a teacher set of random adapters (``--teachers`` per task, 4 tasks) for the geometry's layout,
then runs ``llgbm train --config configs/benchmarks/train.yaml`` twice on it, as subprocesses: with
``loss.mode=weight_only`` (DnD's token loss alone) and with ``loss.mode=multitask`` (the same loss plus
the delta term: K = batch-size generated adapters x the 5 generic probes, forward + backward through
the base model). ``tiny`` trains on the shipped tiny model; the Qwen2.5 geometries on a random-weight
model of their sizes (``benchmarks/delta.py``'s, optionally only ``--layers`` deep) saved to
``<out>/base-model`` with the tiny tokenizer, so nothing is downloaded. ``key=value`` arguments
override the run config of both runs.

Reported per run: the median ``step_time`` of metrics.jsonl after ``--warmup`` steps (forward,
backward, optimizer; batch loading overlaps with it only when ``data.num_workers`` > 0), the whole
run's wall time (start-up, teacher deltas, steps, the final checkpoint) and the delta loss of the
first and last ten steps (fewer in runs under 20 steps; it falls if the term trains the generator). The last lines are
machine-readable:
    delta_vs_weight_step_ratio=X   (multitask step time / weight-only step time)
    weight_step_ms=W, delta_step_ms=D
    delta_loss_ratio=L             (mean loss/delta of the last ten steps / of the first ten)

Run time on 2 CPU cores: 30-90 s for ``--steps 30`` on ``tiny``, depending on the other work there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/delta.py and benchmarks/scaling.py, next to this file
from delta import DTYPES, GEOMETRIES, build_model, geometry_config
from scaling import write_teachers

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "benchmarks" / "train.yaml"
TASKS = 4


def write_base_model(out: Path, geometry: str, layers: int | None, device: str) -> Path:
    """A random-weight model directory of ``geometry`` (config, bf16 safetensors as released checkpoints,
    the tiny tokenizer); the trainer loads it in the run's dtype."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from llgbm_ext.models.registry import resolve_base_model

    logging.disable_progress_bar()
    model, _ = build_model(geometry, layers, device, "bf16")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_base_model("tiny")).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the GPU to the training runs
    return out


def train(out: Path, mode: str, args: argparse.Namespace, teachers: Path) -> dict:
    """One ``llgbm train`` run in a subprocess; its step times, delta losses and wall time."""
    overrides = [f"out_dir={out}", f"data.teachers={teachers}", f"device={args.device}", f"steps={args.steps}",
                 f"dtype={'bfloat16' if args.dtype == 'bf16' else 'float32'}", f"loss.mode={mode}", *args.overrides]
    cmd = [sys.executable, "-m", "llgbm_ext", "train", "--config", str(CONFIG), "--no-progress", *overrides]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"llgbm train ({mode}) failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    delta = [s["loss/delta"] for s in steps if "loss/delta" in s]
    edge = max(1, min(10, len(delta) // 2))  # first and last ten steps, fewer in a short run
    return {"step_s": statistics.median(s["step_time"] for s in steps[args.warmup:]), "wall_s": wall,
            "delta_first": statistics.mean(delta[:edge]) if delta else None,
            "delta_last": statistics.mean(delta[-edge:]) if delta else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES.keys() - {"smollm2"}), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="Qwen2.5 geometries: keep only the first N layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype on the delta path")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the step time")
    parser.add_argument("--teachers", type=int, default=4, help="random teacher adapters per task (4 tasks)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one, removed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides for both runs")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    if args.steps <= args.warmup or args.warmup < 0 or args.teachers < 1:
        parser.error("need --steps > --warmup >= 0 and --teachers >= 1")
    if args.layers is not None and args.geometry == "tiny":
        parser.error("--layers applies to the Qwen2.5 geometries; tiny is the shipped 4-layer model")

    from llgbm_ext.lora.layout import get_layout

    with tempfile.TemporaryDirectory(prefix="llgbm-train-bench-") as tmp:
        root = args.out or Path(tmp)
        if root.exists() and any(root.iterdir()):
            parser.error(f"--out {root}: exists and is not empty")
        start = time.perf_counter()
        if args.geometry == "tiny":
            model_name, layout = "tiny", get_layout("tiny")
        else:
            model_dir = write_base_model(root / "base-model", args.geometry, args.layers, args.device)
            _, _, layout = geometry_config(args.geometry, args.layers)
            model_name = str(model_dir)
        teachers = write_teachers(root / "teachers", TASKS, args.teachers, layout, model_name)
        prepared = time.perf_counter() - start
        runs = {mode: train(root / mode, mode, args, teachers) for mode in ("weight_only", "multitask")}

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"geometry {args.geometry}: {layout.num_layers} layers, {layout.num_tokens} LoRA tokens; {args.dtype} base, "
          f"{where}; {TASKS * args.teachers} random teachers (written in {prepared:.1f} s); {args.steps} steps "
          f"({args.warmup} warm-up)")
    for mode, r in runs.items():
        losses = f", loss/delta {r['delta_first']:.4f} -> {r['delta_last']:.4f}" if r["delta_first"] is not None else ""
        print(f"  {mode:12s} median step {r['step_s'] * 1e3:8.1f} ms, run {r['wall_s']:6.1f} s{losses}")
    weight, delta = runs["weight_only"], runs["multitask"]
    print(f"delta_vs_weight_step_ratio={delta['step_s'] / weight['step_s']:.3f}")
    print(f"weight_step_ms={weight['step_s'] * 1e3:.2f}")
    print(f"delta_step_ms={delta['step_s'] * 1e3:.2f}")
    if delta["delta_first"] is not None:
        print(f"delta_loss_ratio={delta['delta_last'] / delta['delta_first']:.3f}")


if __name__ == "__main__":
    main()
