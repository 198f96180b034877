"""``llgbm model NAME``: resolve a base model (creating ``tiny`` on first use) and show its LoRA layout."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("model", parents=[common], help="resolve a base model and print its directory and LoRA layout")
    p.add_argument("name", help="'tiny', a local model directory, or a hub id already in the local cache")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank used to derive the layout (default 8)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lora.layout import layout_from_config
    from ..models.registry import resolve_base_model

    path = resolve_base_model(args.name)
    layout = layout_from_config(path, rank=args.rank, name=args.name)
    print(f"model:  {path}")
    print(
        f"layout: {layout.num_layers} layers, hidden {layout.hidden_size}, intermediate {layout.intermediate_size}, "
        f"kv {layout.kv_size}, rank {layout.rank}, chunk {layout.chunk}, "
        f"{layout.num_tokens} tokens of {layout.token_size[0]}x{layout.token_size[1]}"
    )
    return 0
