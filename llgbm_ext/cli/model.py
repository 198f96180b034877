"""``llgbm model NAME``: resolve a base model (creating it on first use) and show its LoRA layout;
``llgbm model tiny --rebuild`` pretrains the shipped ``tiny`` again and compares the weights."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("model", parents=[common], help="resolve a base model and print its directory and LoRA layout")
    p.add_argument("name", help="'tiny', a local model directory, or a hub id already in the local cache")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank used to derive the layout (default 8)")
    p.add_argument("--rebuild", action="store_true",
                   help="tiny only: pretrain it again from its recipe (minutes) and compare with the shipped weights")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LLGBMError
    from ..lora.layout import layout_from_config
    from ..models.registry import resolve_base_model

    if args.rebuild and args.name != "tiny":
        raise LLGBMError(f"--rebuild: only 'tiny' is built from a recipe, not {args.name}")
    path = resolve_base_model(args.name)
    layout = layout_from_config(path, rank=args.rank, name=args.name)
    print(f"model:  {path}")
    print(
        f"layout: {layout.num_layers} layers, hidden {layout.hidden_size}, intermediate {layout.intermediate_size}, "
        f"kv {layout.kv_size}, rank {layout.rank}, chunk {layout.chunk}, "
        f"{layout.num_tokens} tokens of {layout.token_size[0]}x{layout.token_size[1]}"
    )
    if args.rebuild:
        rebuild_report(path)
    return 0


def rebuild_report(shipped) -> None:
    """Pretrain ``tiny`` again and print the max |Δ| per tensor against the shipped weights, then one verdict line."""
    import math

    import torch

    from ..models.pretrain import PretrainConfig, rebuild_pretrained_model
    from ..models.shipped import shipped_recipe, weight_differences

    recipe = shipped_recipe()
    print(f"rebuilding tiny from its recipe ({PretrainConfig().steps} steps on one thread, a few minutes; "
          f"shipped weights built with torch {recipe['torch']}, this is torch {torch.__version__}) ...", flush=True)
    rebuilt = rebuild_pretrained_model()
    print(f"rebuilt: {rebuilt}")
    differences = weight_differences(shipped, rebuilt)
    width = max(map(len, differences))
    for name, diff in differences.items():
        print(f"  {name:<{width}}  max |Δ| = {'missing or reshaped' if diff == math.inf else f'{diff:.3g}'}")
    worst = max(differences.values())
    print(f"shipped vs rebuilt: {'identical' if worst == 0 else f'differs (max |Δ| = {worst:.3g})'}")
