"""Benchmark: generated-LoRA deltas, batched vs per-adapter loop vs the plain base model.

    python benchmarks/delta.py [--geometry tiny|smollm2|qwen2.5-0.5b-4layers] [--repeats N]
                               [--layers N] [--threads N]

K = 8 adapters x P = 5 probes (the generic set), forward + backward through the generated-LoRA path
(``mean_activations`` with factors that require grad), on a randomly initialised base model of the
chosen geometry (nothing is downloaded). Three variants over the same K·P token rows:
  * batched: all K adapters in one forward (FunctionalLoRA), one backward;
  * loop:    one forward per adapter (the original LLGBM's pattern), graphs kept, one backward;
  * plain:   the base model alone, no LoRA, with gradients taken w.r.t. the input embeddings so that
             the backward runs through every layer as it does for the LoRA.
Times are medians over ``--repeats`` rounds after one warm-up round; the variants take turns within
a round, so a change in machine load hits all of them alike.

Run time on 2 CPU cores (1 torch thread): ``tiny`` about 30 s; ``smollm2 --layers 6`` (SmolLM2-135M
widths, 6 of its 30 layers) about 1.5-2 min with ``--repeats 3``; the full ``smollm2`` and
``qwen2.5-0.5b-4layers`` take 5 min or more. On a machine shared with other jobs, pass
``--threads 1``: oversubscribed torch threads make every variant several times slower and the
timings meaningless.

Peak memory: each of batched and plain runs in a fresh subprocess; after a warm-up step, the Linux
peak-RSS counter is reset (``/proc/self/clear_refs``) and one step runs; the peak is the growth of
VmHWM over VmRSS just before the step. glibc's mmap threshold is pinned low
(MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the OS and RSS tracks live memory.

The last three lines are machine-readable:
    batched_vs_loop_speedup=X   (loop time / batched time)
    batched_vs_plain_ratio=Y    (batched time / plain time)
    peak_mem_ratio=Z            (batched peak / plain peak)
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
from llgbm_ext.lora.layout import layout_from_config
from llgbm_ext.models.tiny import TINY_CONFIG, build_tokenizer

K, RANK = 8, 8
GEOMETRIES = {
    "tiny": ("qwen2", dict(TINY_CONFIG, vocab_size=2048)),
    # SmolLM2-135M (Llama architecture)
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    # Qwen2.5-0.5B widths, first 4 of its 24 layers
    "qwen2.5-0.5b-4layers": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                           tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


def build(geometry: str, layers: int | None = None, seed: int = 0):
    """Random model of a geometry (optionally only its first ``layers`` layers), its layout, the probe
    batch and generated factors (leaves with grad)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, config = GEOMETRIES[geometry]
    if layers:
        config = dict(config, num_hidden_layers=layers)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).eval().requires_grad_(False)
    # the generic probes' token lengths from the tiny tokenizer; random ids of those lengths
    lengths_from = encode_probes(get_probe_set("generic"), build_tokenizer())
    ids = torch.randint(0, config["vocab_size"], lengths_from.input_ids.shape) * lengths_from.attention_mask
    batch = ProbeBatch(ids, lengths_from.attention_mask, "right")
    layout = layout_from_config(config, rank=RANK)
    factors = {p: (a.requires_grad_(), b.requires_grad_()) for p, (a, b) in random_factors(layout, K).items()}
    return model, layout, batch, factors


def step(variant: str, lora: FunctionalLoRA, batch: ProbeBatch, factors) -> None:
    """One forward + backward of ``variant`` (batched | loop | plain)."""
    for a, b in factors.values():
        a.grad = b.grad = None
    if variant == "batched":
        v = mean_activations(lora, batch, factors)  # (K, H), one forward over K*P rows
    elif variant == "loop":
        v = torch.cat([mean_activations(lora, batch, {p: (a[k], b[k]) for p, (a, b) in factors.items()}) for k in range(K)])
    else:
        ids, mask = batch.input_ids.repeat(K, 1), batch.attention_mask.repeat(K, 1)  # (K*P, T)
        embeds = lora.backbone.embed_tokens(ids).detach().requires_grad_()  # the backward reaches every layer
        hidden = lora.backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        last = (mask * torch.arange(ids.shape[1])).argmax(-1)
        v = probe_mean(hidden.last_hidden_state[torch.arange(ids.shape[0]), last].float(), K)  # (K, H)
    v.square().sum().backward()


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1))


def measure_memory(geometry: str, layers: int | None, variant: str) -> int:
    """Peak RSS growth (bytes) of one step, after a warm-up step; runs inside a fresh subprocess."""
    model, layout, batch, factors = build(geometry, layers)
    lora = FunctionalLoRA(model, layout)
    step(variant, lora, batch, factors)  # warm-up
    for a, b in factors.values():
        a.grad = b.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    step(variant, lora, batch, factors)
    return (_kib("VmHWM") - before) * 1024


def peak_memory(args: argparse.Namespace, variant: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--geometry", args.geometry, "--memory-of", variant]
    for flag, value in (("--layers", args.layers), ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers of the geometry")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-of", choices=["batched", "plain"], help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory(args.geometry, args.layers, args.memory_of)}))
        return

    model, layout, batch, factors = build(args.geometry, args.layers)
    lora = FunctionalLoRA(model, layout)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    print(f"geometry {args.geometry}: {layout.num_layers} layers, hidden {layout.hidden_size}, "
          f"{params / 1e6:.1f}M non-embedding params; K={K} adapters x P={len(batch)} probes, "
          f"T={batch.input_ids.shape[1]} tokens, rank {RANK}; torch threads {torch.get_num_threads()}")
    variants = ("batched", "loop", "plain")
    runs = {variant: [] for variant in variants}
    for repeat in range(args.repeats + 1):  # round-robin, so a change in machine load hits all variants alike
        for variant in variants:
            start = time.perf_counter()
            step(variant, lora, batch, factors)
            if repeat:  # repeat 0 is the warm-up
                runs[variant].append(time.perf_counter() - start)
    times = {variant: statistics.median(runs[variant]) for variant in variants}
    for variant in variants:
        print(f"  {variant:8s} forward+backward: median {times[variant] * 1e3:9.1f} ms over {args.repeats} runs")
    memory = {v: peak_memory(args, v) for v in ("batched", "plain")}
    for variant, peak in memory.items():
        print(f"  {variant:8s} peak RSS growth of one step: {peak / 2**20:9.1f} MiB")
    print(f"batched_vs_loop_speedup={times['loop'] / times['batched']:.3f}")
    print(f"batched_vs_plain_ratio={times['batched'] / times['plain']:.3f}")
    print(f"peak_mem_ratio={memory['batched'] / memory['plain']:.3f}")


if __name__ == "__main__":
    main()
