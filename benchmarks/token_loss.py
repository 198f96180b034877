"""DnD's token criterion: the fused ``TokenMSELoss`` vs the plain autograd expression, side by side.

    python benchmarks/token_loss.py [--layout tiny] [--batch 8] [--repeats 20] [--threads 1] [--device cpu|cuda]

Forward and backward of ``mean over non-NaN targets of w_n·(pred − target)²`` on a batch of tokens of
``--layout`` (``tiny`` at batch 8: the default demo's generator step). The two are checked to give the
same loss and gradient bits first. Runs alternate (plain, fused, plain, ...) so that a host whose speed
drifts slows both alike. Prints the median times, their ratio, and the bytes each keeps for the backward.
"""

import argparse
import statistics
import time

import torch
from torch.autograd.graph import saved_tensors_hooks

from llgbm_ext.lora.layout import get_layout
from llgbm_ext.losses import TokenMSELoss


def plain_loss(pred, target, weight):
    """The criterion written as autograd sees it, unfused (what ``TokenMSELoss`` computed before)."""
    mask = ~torch.isnan(target)
    squares = torch.where(mask, pred - target, 0.0).square() * weight[:, None, None]
    return squares.sum() / mask.sum()


def saved_bytes(loss_fn):
    """Bytes of the tensors autograd keeps for the backward of ``loss_fn()``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demo's processes use 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    layout = get_layout(args.layout)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, layout.num_tokens, *layout.token_size)
    target = torch.randn(shape, generator=gen)
    target[..., layout.rank : layout.token_size[0] - 2, : layout.chunk] = float("nan")  # unused cells, if any
    pred = torch.randn(shape, generator=gen).to(args.device).requires_grad_()
    target = target.to(args.device)
    weight = (torch.rand(layout.num_tokens, generator=gen) + 0.5).to(args.device)
    fused_module = TokenMSELoss(weight).to(args.device)
    runs = {"plain": lambda: plain_loss(pred, target, weight), "fused": lambda: fused_module(pred, target)["loss"]}

    grads = {}
    for name, loss_fn in runs.items():
        loss = loss_fn()
        grads[name] = (loss.detach(), torch.autograd.grad(loss, pred)[0])
    assert torch.equal(grads["plain"][0], grads["fused"][0]) and torch.equal(grads["plain"][1], grads["fused"][1])

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {name: [] for name in runs}
    for _ in range(args.repeats + 2):  # the first two rounds warm up
        for name, loss_fn in runs.items():
            sync()
            start = time.perf_counter()
            loss_fn().backward()
            sync()
            times[name].append(time.perf_counter() - start)
            pred.grad = None
    plain, fused = (statistics.median(times[name][2:]) for name in runs)
    memory = {name: saved_bytes(loss_fn) for name, loss_fn in runs.items()}
    print(f"layout {layout.name}: batch {args.batch} x {layout.num_tokens} tokens of {layout.token_size}, "
          f"{args.device}, torch threads {torch.get_num_threads()}; loss and gradient bits equal")
    for name, seconds in (("plain", plain), ("fused", fused)):
        print(f"{name:5}  forward+backward {seconds * 1e3:8.2f} ms   kept for backward {memory[name] / 2**20:8.1f} MiB")
    print(f"speedup={plain / fused:.2f}")
    print(f"saved_memory_ratio={memory['plain'] / memory['fused']:.2f}")


if __name__ == "__main__":
    main()
