"""Row fingerprints of the DnD plugin (``llgbm_ext.dnd.rows.token_fingerprint``): their share of a training step.

    python benchmarks/row_hash.py [--steps 8] [--repeats 5] [--tflops 400]

The dataset hook fingerprints every collated row and the loss hook every row that gets a behaviour
term, each training step, before the forward. Printed side by side: the whole-row hash (every byte of
every row) and ``token_fingerprint`` (the row's shape and a fixed sample of its values).

1. The CPU smoke task (DnD's own loop, dataset and HyperConv on the ``tiny`` layout; needs dnd_repo/),
   in-process with the DataLoader in the main process so the collate's hashing counts too: ms per
   step spent fingerprinting (median call x calls per step), the step's ms, the share.
2. The 1.5B token size ((4508, 18, 258) bf16, 4 and 8 rows): ms of both hashes and their ratio, and the
   share of an estimated DnD 1.5B step: forward + backward of DnD's 1.5B HyperConv (llgbm_ext's
   output-equal HyperConv with DnD's math features, 16 rows per GPU as 128 over 8 GPUs) counted in
   FLOPs on the meta device, at an assumed sustained ``--tflops`` (default 400: an H100 at about 40%
   of its bf16 peak; no GPU here to time it on). The loss hook hashes ``delta_rows`` rows (4 in the
   shipped 1.5B configs) in the training process, while the GPU waits.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

import llgbm_ext.dnd.loss as loss_hook
from llgbm_ext.dnd import rows
from llgbm_ext.generator.hyperconv import HyperConvDecoder

REPO = Path(__file__).resolve().parents[1]
MATH_1_5B = [(32, 1000, 384), (64, 500, 300), (256, 500, 300), (512, 125, 300), (1024, 64, 256), (2048, 32, 256),
             (4508, 18, 258)]  # DnD's train_qwen1.5lora_Math.py model_config features, kernel 11


def whole_row_fingerprint(tokens: torch.Tensor) -> torch.Tensor:
    """The reference: BLAKE2b-128 of every byte of each row (NaN read as 0), as two int64 words."""
    data = torch.nan_to_num(tokens.detach(), nan=0.0).flatten(1).cpu().contiguous().view(torch.uint8).numpy()
    digests = b"".join(hashlib.blake2b(row, digest_size=16).digest() for row in data)
    return torch.from_numpy(np.frombuffer(digests, dtype=np.int64).copy()).view(-1, 2)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def fingerprint_as(fn, calls: list[tuple[float, float]]):
    """Every fingerprint of both hooks through ``fn``, each call's (start, seconds) appended to ``calls``."""
    def timed(tokens):
        start = time.perf_counter()
        out = fn(tokens)
        calls.append((start, time.perf_counter() - start))
        return out

    saved = rows.token_fingerprint, loss_hook.token_fingerprint
    rows.token_fingerprint = loss_hook.token_fingerprint = timed
    try:
        yield
    finally:
        rows.token_fingerprint, loss_hook.token_fingerprint = saved


def smoke_checkout(folder: Path) -> Path:
    from llgbm_ext.cli.dnd import overlay

    root = folder / "checkout"
    (root / "workspace").mkdir(parents=True)
    (root / "workspace" / "dnd").symlink_to(REPO / "dnd_repo" / "workspace" / "dnd", target_is_directory=True)
    overlay(REPO / "workspace_overrides", root)
    return root


def smoke_step(root: Path, fingerprint, steps: int) -> tuple[float, float]:
    """(ms per step, ms fingerprinting per step) of the smoke task, its first step (the teacher
    precompute) left out."""
    from llgbm_ext.dnd.config import load_plugin_config
    from llgbm_ext.dnd.runner import run_dnd_script

    config = load_plugin_config(REPO / "workspace_overrides" / "llgbm" / "configs" / "smoke.yaml",
                                [f"cache_dir={root / 'cache'}"])
    os.environ.update(LLGBM_SMOKE_STEPS=str(steps), LLGBM_SMOKE_WORKERS="0")
    ends, calls = [], []
    hook = register_optimizer_step_post_hook(lambda *_: ends.append(time.perf_counter()))
    try:
        with fingerprint_as(fingerprint, calls), contextlib.redirect_stdout(io.StringIO()):
            run_dnd_script(root / "workspace" / "main" / "tasks" / "llgbm_smoke" / "train_tinylora_Smoke.py", [],
                           config)
    finally:
        hook.remove()
    timed = len(ends) - 1
    inside = [seconds for start, seconds in calls if ends[0] < start < ends[-1]]
    # the median call times the calls per step: a shared machine's odd preempted call left out
    return 1e3 * (ends[-1] - ends[0]) / timed, 1e3 * statistics.median(inside) * len(inside) / timed


def estimated_step_ms(tflops: float, batch: int = 16) -> float:
    with torch.device("meta"):
        decoder = HyperConvDecoder(MATH_1_5B, 11)
        condition = torch.zeros(batch, *MATH_1_5B[0])
    counter = FlopCounterMode(display=False)
    with counter:
        decoder(condition).sum().backward()
    return counter.get_total_flops() / (tflops * 1e12) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="smoke-task training steps (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tflops", type=float, default=400.0, help="assumed sustained GPU throughput of a DnD step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {rows.SAMPLE} sampled values per row")

    if (REPO / "dnd_repo" / "workspace" / "dnd" / "model").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            root = smoke_checkout(Path(tmp))
            for name, fn in (("whole row", whole_row_fingerprint), ("sampled", rows.token_fingerprint)):
                step, hashing = smoke_step(root, fn, args.steps)
                print(f"smoke task, {name:9s}: step {step:7.1f} ms, fingerprints {hashing:6.2f} ms/step "
                      f"= {100 * hashing / step:5.2f}% of the step")
    else:
        print("smoke task: skipped (dnd_repo/ is empty; see README 'Testing against DnD')")

    step = estimated_step_ms(args.tflops)
    print(f"DnD 1.5B step (16 rows/GPU, forward + backward of its HyperConv at {args.tflops:.0f} TFLOP/s): "
          f"~{step:.0f} ms")
    for batch in (4, 8):
        tokens = torch.randn(batch, *MATH_1_5B[-1]).to(torch.bfloat16)
        whole = median_ms(lambda t=tokens: whole_row_fingerprint(t), args.repeats)
        sampled = median_ms(lambda t=tokens: rows.token_fingerprint(t), args.repeats)
        print(f"1.5B tokens, {batch} rows: whole row {whole:8.1f} ms ({100 * whole / (step + whole):5.2f}% of a step), "
              f"sampled {sampled:6.2f} ms ({100 * sampled / (step + sampled):6.3f}%), ratio {whole / sampled:7.0f}x")


if __name__ == "__main__":
    sys.exit(main())
