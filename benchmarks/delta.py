"""Benchmark: generated-LoRA deltas, batched vs per-adapter loop vs the plain base model, on CPU or CUDA.

    python benchmarks/delta.py [--device cpu|cuda] [--geometry tiny|smollm2|qwen2.5-0.5b|qwen2.5-1.5b]
                               [--layers N] [--dtype fp32|bf16] [--adapters K [K ...]] [--probes P]
                               [--repeats N] [--threads N] [--no-memory]

K adapters (default 8) x P probes (default 5, the generic set's token lengths), forward + backward
through the generated-LoRA path (``mean_activations`` with factors that require grad), on a randomly
initialised base model of the chosen geometry (nothing is downloaded; ``--layers N`` keeps its first
N decoder layers, for CPUs). Geometries: the embedded ``tiny``, SmolLM2-135M, and Qwen2.5-0.5B /
1.5B (hidden 896 / 1536, intermediate 4864 / 8960, 14 / 12 heads, 2 KV heads, 24 / 28 layers, vocab
151936, LoRA rank 8 / 16 as DnD's adapters; the layouts ``qwen2.5-0.5b`` / ``qwen2.5-1.5b`` of
``llgbm_ext.lora.layout``). Three variants over the same K·P token rows:
  * batched: all K adapters in one forward (FunctionalLoRA), one backward;
  * loop:    one forward per adapter (the original LLGBM's pattern), graphs kept, one backward;
  * plain:   the base model alone, no LoRA, with gradients taken w.r.t. the input embeddings so that
             the backward runs through every layer as it does for the LoRA.
Times are medians over ``--repeats`` rounds after one warm-up round; the variants take turns within
a round, so a change in machine load hits all of them alike. The warm-up round also checks that
batched and loop give the same Δ = v(base + LoRA) − v(base) (``delta_cos``: their cosine over all
adapters, 1 up to rounding; bf16 rounds more).

Run time on 2 CPU cores (1 torch thread, shared with other work): ``tiny`` about 30 s;
``qwen2.5-0.5b --layers 2`` about 3 min; ``smollm2 --layers 6`` about 1.5-2 min; full depths take
5 min or more on CPU. On a machine shared with other jobs, pass ``--threads 1``: oversubscribed torch threads make
every variant several times slower and the timings meaningless. On a GPU (``--device cuda --dtype
bf16``) the full Qwen2.5 depths take seconds; ``benchmarks/gpu.sh`` runs them.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step after the warm-up, minus
what was allocated before it (batched, loop and plain). On CPU, each of batched and plain runs in a
fresh subprocess; after a warm-up step, the Linux peak-RSS counter is reset
(``/proc/self/clear_refs``) and one step runs; the peak is the growth of VmHWM over VmRSS just before
the step. glibc's mmap threshold is pinned low (MALLOC_MMAP_THRESHOLD_) so that freed tensors go
back to the OS and RSS tracks live memory. ``--no-memory`` skips this (and ``peak_mem_ratio``).

The last lines are machine-readable, per K (with several ``--adapters``, each key ends in ``_k<K>``):
    batched_vs_loop_speedup=X    (loop time / batched time)
    batched_vs_plain_ratio=Y     (batched time / plain time)
    peak_mem_ratio=Z             (batched peak / plain peak)
    batched_ms_per_adapter=A     (batched time / K)
    delta_cos=C                  (cosine of the batched and the loop Δ)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from llgbm_ext.delta.activations import mean_activations, probe_mean
from llgbm_ext.delta.functional import FunctionalLoRA
from llgbm_ext.delta.probes import ProbeBatch, encode_probes, get_probe_set
from llgbm_ext.lora.factors import random_factors
from llgbm_ext.lora.layout import NAMED_LAYOUTS, LoraLayout, layout_from_config
from llgbm_ext.models.tiny import TINY_CONFIG

QWEN25 = {"num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "max_position_embeddings": 32768, "use_sliding_window": False}
# name -> (architecture, config, LoRA rank)
GEOMETRIES = {
    "tiny": ("qwen2", dict(TINY_CONFIG, vocab_size=2048), 8),
    # SmolLM2-135M (Llama architecture)
    "smollm2": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                          "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                          "rms_norm_eps": 1e-5}, 8),
    "qwen2.5-0.5b": ("qwen2", dict(QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14), NAMED_LAYOUTS["qwen2.5-0.5b"].rank),
    "qwen2.5-1.5b": ("qwen2", dict(QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12), NAMED_LAYOUTS["qwen2.5-1.5b"].rank),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("batched", "loop", "plain")


def probe_batch(vocab_size: int, probes: int, device: str, seed: int = 0) -> ProbeBatch:
    """P rows of random token ids with the generic probes' token lengths (under the tiny tokenizer),
    cycled when P exceeds the set's 5 probes; right-padded."""
    from transformers import AutoTokenizer

    from llgbm_ext.models.registry import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("tiny"))
    lengths_from = encode_probes(get_probe_set("generic"), tokenizer)
    rows = torch.arange(probes) % len(lengths_from)
    mask = lengths_from.attention_mask[rows]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, mask.shape, generator=generator) * mask
    return ProbeBatch(ids, mask, "right").to(device)


def geometry_config(geometry: str, layers: int | None = None) -> tuple[str, dict, LoraLayout]:
    """(architecture, model config, LoRA layout) of a geometry, optionally only its first ``layers`` layers."""
    family, config, rank = GEOMETRIES[geometry]
    if layers:
        config = dict(config, num_hidden_layers=layers)
    return family, config, layout_from_config(config, rank=rank, name=geometry)


def build_model(geometry: str, layers: int | None = None, device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """Random, frozen model of a geometry (optionally only its first ``layers`` layers) and its LoRA layout."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    family, config, layout = geometry_config(geometry, layers)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device it runs on (fast on a GPU, no host copy)
        model = model_cls(config_cls(**config))
    model = model.to(DTYPES[dtype]).eval().requires_grad_(False)
    return model, layout


def make_factors(layout, k: int, device: str, seed: int = 0):
    """K random generated adapters: fp32 leaves with grad (as a generator's output), on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return {p: (a.to(device).requires_grad_(), b.to(device).requires_grad_())
            for p, (a, b) in random_factors(layout, k, generator=generator).items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(variant: str, lora: FunctionalLoRA, batch: ProbeBatch, factors) -> torch.Tensor:
    """One forward + backward of ``variant`` (batched | loop | plain); returns v, (K, H) fp32, detached."""
    k = next(iter(factors.values()))[0].shape[0]
    for a, b in factors.values():
        a.grad = b.grad = None
    if variant == "batched":
        v = mean_activations(lora, batch, factors)  # (K, H), one forward over K*P rows
    elif variant == "loop":
        v = torch.cat([mean_activations(lora, batch, {p: (a[i], b[i]) for p, (a, b) in factors.items()}) for i in range(k)])
    else:
        ids, mask = batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1)  # (K*P, T)
        embeds = lora.backbone.embed_tokens(ids).detach().requires_grad_()  # the backward reaches every layer
        hidden = lora.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        last = (mask * torch.arange(ids.shape[1], device=ids.device)).argmax(-1)
        v = probe_mean(hidden.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last].float(), k)  # (K, H)
    v.square().sum().backward()
    return v.detach()


def delta_cos(v_batched: torch.Tensor, v_loop: torch.Tensor, v_base: torch.Tensor) -> float:
    """Cosine between the batched and the loop Δ = v − v(base), over all K adapters at once."""
    a, b = (v_batched - v_base).flatten(), (v_loop - v_base).flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def cuda_peak(variant: str, lora: FunctionalLoRA, batch: ProbeBatch, factors) -> int:
    """Peak CUDA memory (bytes) one step allocates on top of what was allocated before it."""
    for a, b in factors.values():
        a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(variant, lora, batch, factors)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def measure_rss(args: argparse.Namespace, variant: str) -> int:
    """Peak RSS growth (bytes) of one step, after a warm-up step; runs inside a fresh subprocess."""
    model, layout = build_model(args.geometry, args.layers, "cpu", args.dtype)
    lora, batch = FunctionalLoRA(model, layout), probe_batch(model.config.vocab_size, args.probes, "cpu")
    factors = make_factors(layout, args.adapters[0], "cpu")
    step(variant, lora, batch, factors)  # warm-up
    for a, b in factors.values():
        a.grad = b.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    step(variant, lora, batch, factors)
    return (_kib("VmHWM") - before) * 1024


def rss_peak(args: argparse.Namespace, k: int, variant: str) -> int:
    """``measure_rss`` of K adapters in a fresh subprocess, so earlier allocations do not hide the peak."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--geometry", args.geometry, "--dtype", args.dtype, "--adapters", str(k),
           "--probes", str(args.probes), "--memory-of", variant]
    for flag, value in (("--layers", args.layers), ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"memory subprocess ({variant}, K={k}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def run_k(args: argparse.Namespace, lora: FunctionalLoRA, batch: ProbeBatch, k: int) -> dict[str, float]:
    """Times, peak memories and the Δ check of K adapters; the ratios, keyed as printed."""
    factors = make_factors(lora.layout, k, args.device)
    runs: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    values: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats + 1):  # round-robin, so a change in machine load hits all variants alike
        for variant in VARIANTS:
            sync(args.device)
            start = time.perf_counter()
            v = step(variant, lora, batch, factors)
            sync(args.device)
            if repeat:  # repeat 0 is the warm-up
                runs[variant].append(time.perf_counter() - start)
            else:
                values[variant] = v
    times = {variant: statistics.median(runs[variant]) for variant in VARIANTS}
    cos = delta_cos(values["batched"], values["loop"], values["plain"][0])
    if args.no_memory:
        memory, kind = {}, ""
    elif args.device.startswith("cuda"):
        memory = {variant: cuda_peak(variant, lora, batch, factors) for variant in VARIANTS}
        kind = "CUDA peak allocated"
    else:
        memory = {variant: rss_peak(args, k, variant) for variant in ("batched", "plain")}
        kind = "peak RSS growth"
    print(f"K={k} adapters x P={len(batch)} probes ({k * len(batch)} rows):")
    for variant in VARIANTS:
        print(f"  {variant:8s} forward+backward: median {times[variant] * 1e3:9.1f} ms over {args.repeats} runs, "
              f"{times[variant] / k * 1e3:8.2f} ms per adapter")
    for variant, peak in memory.items():
        print(f"  {variant:8s} {kind} of one step: {peak / 2**20:9.1f} MiB")
    ratios = {"batched_vs_loop_speedup": times["loop"] / times["batched"],
              "batched_vs_plain_ratio": times["batched"] / times["plain"]}
    if memory:
        ratios["peak_mem_ratio"] = memory["batched"] / max(memory["plain"], 1)
    return {**ratios, "batched_ms_per_adapter": times["batched"] / k * 1e3, "delta_cos": cos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers of the geometry")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="base model dtype (factors stay fp32)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[8], metavar="K", help="adapter counts K to measure")
    parser.add_argument("--probes", type=int, default=5, help="probes P per adapter")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-of", choices=["batched", "plain"], help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    counts = {"--adapters": min(args.adapters), "--probes": args.probes, "--repeats": args.repeats,
              "--layers": args.layers, "--threads": args.threads}
    for flag, value in counts.items():
        if value is not None and value < 1:
            parser.error(f"{flag} must be positive, got {value}")
    depth = GEOMETRIES[args.geometry][1]["num_hidden_layers"]
    if args.layers is not None and args.layers > depth:
        parser.error(f"--layers {args.layers}: geometry {args.geometry} has {depth} layers")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_rss(args, args.memory_of)}))
        return

    model, layout = build_model(args.geometry, args.layers, args.device, args.dtype)
    lora, batch = FunctionalLoRA(model, layout), probe_batch(model.config.vocab_size, args.probes, args.device)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"cpu, torch threads {torch.get_num_threads()}"
    print(f"geometry {args.geometry}: {layout.num_layers} layers, hidden {layout.hidden_size}, "
          f"{params / 1e6:.1f}M non-embedding params, {args.dtype}; P={len(batch)} probes of T={batch.input_ids.shape[1]} "
          f"tokens, LoRA rank {layout.rank}; {where}")
    results = {k: run_k(args, lora, batch, k) for k in args.adapters}
    for k, ratios in results.items():
        suffix = f"_k{k}" if len(results) > 1 else ""
        for key, value in ratios.items():
            print(f"{key}{suffix}={value:.{6 if key == 'delta_cos' else 3}f}")


if __name__ == "__main__":
    main()
