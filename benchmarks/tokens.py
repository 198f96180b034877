"""Tokenize / detokenize speed: vectorised (llgbm_ext.lora.tokens) vs a plain per-chunk loop, side by side.

    python benchmarks/tokens.py [--layout qwen2.5-0.5b] [--repeats 5] [--device cpu|cuda]

The loop is what DnD's tokenizers do (one Python iteration per chunk, ~4.3k for the 0.5B layout).
Prints the median times and the ratios; goal: detokenize >= 10x faster than the loop. With
``--device cuda`` both run on the GPU (where the trainer detokenizes), timed with synchronisation.
"""

import argparse
import statistics
import time

import torch

from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout, peft_key
from llgbm_ext.lora.tokens import lora_to_tokens, tokens_to_lora


def loop_tokenize(state_dict, layout):
    height, width = layout.token_size
    tokens = []
    for layer, proj, factor, _, count in layout.token_spans():
        weight = state_dict[peft_key(layer, proj, factor)]
        for chunk in torch.chunk(weight if factor == "A" else weight.T, count, dim=1):
            mean, std = chunk.mean(), chunk.std()
            token = torch.full((height, width), float("nan"), device=chunk.device)
            token[: chunk.shape[0], : chunk.shape[1]] = (chunk - mean) / std
            m, s = mean * 8, torch.log(std * 0.9 + 0.1) + 1.6
            token[-2:, 0::2], token[-2:, 1::2], token[:, -2], token[:, -1] = m, s, m, s
            tokens.append(token)
    return torch.stack(tokens)


def loop_detokenize(tokens, layout):
    rank, chunk = layout.rank, layout.chunk
    state_dict, t = {}, 0
    for layer, proj, factor, _, count in layout.token_spans():
        pieces = []
        for token in tokens[t : t + count]:
            code = (token[-2:, :].unfold(-1, 2, 2).mean(1) + token[:, -2:].reshape(-1, 2, 2).mean(0)) * 0.5
            mean = (code[:, 0] / 8).mean()
            std = ((torch.exp(code[:, 1] - 1.6) - 0.1) / 0.9).mean()
            pieces.append(token[:rank, :chunk] * std + mean)
        weight = torch.cat(pieces, dim=1)
        state_dict[peft_key(layer, proj, factor)] = weight if factor == "A" else weight.T
        t += count
    return state_dict


def median_time(fn, repeats, device):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    layout = get_layout(args.layout)
    sd = {k: v.to(args.device) for k, v in state_dict_from_factors(random_factors(layout), layout).items()}
    tokens = lora_to_tokens(sd, layout)
    back, ref = tokens_to_lora(tokens, layout), loop_detokenize(tokens, layout)
    assert torch.allclose(loop_tokenize(sd, layout), tokens, atol=1e-6, equal_nan=True)
    assert all(torch.allclose(back[k], ref[k], atol=1e-6) for k in back)

    t_tok_vec = median_time(lambda: lora_to_tokens(sd, layout), args.repeats, args.device)
    t_tok_loop = median_time(lambda: loop_tokenize(sd, layout), args.repeats, args.device)
    t_det_vec = median_time(lambda: tokens_to_lora(tokens, layout), args.repeats, args.device)
    t_det_loop = median_time(lambda: loop_detokenize(tokens, layout), args.repeats, args.device)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"torch threads {torch.get_num_threads()}"
    print(f"layout {layout.name}: {layout.num_tokens} tokens of {layout.token_size}, {args.device}, {where}")
    print(f"tokenize    vectorised {t_tok_vec * 1e3:8.1f} ms   loop {t_tok_loop * 1e3:8.1f} ms")
    print(f"detokenize  vectorised {t_det_vec * 1e3:8.1f} ms   loop {t_det_loop * 1e3:8.1f} ms")
    print(f"tokenize_speedup={t_tok_loop / t_tok_vec:.1f}")
    print(f"detokenize_speedup={t_det_loop / t_det_vec:.1f}")


if __name__ == "__main__":
    main()
