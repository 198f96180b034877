"""``llgbm tokens encode|decode``: convert adapters to DnD tokens and back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tokens", parents=[common], help="convert LoRA adapters to DnD tokens and back")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    layout_args = argparse.ArgumentParser(add_help=False)
    layout_args.add_argument("--layout", required=True,
                             help="qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b | tiny | a model directory with config.json")
    layout_args.add_argument("--rank", type=int, help="LoRA rank (default: the layout's)")
    layout_args.add_argument("--alpha", type=float, help="LoRA alpha (default: the layout's, or 2 x rank)")

    enc = actions.add_parser("encode", parents=[common, layout_args],
                             help="adapter (PEFT dir or DnD <step>.safetensors) -> tokens .safetensors")
    enc.add_argument("adapter", help="PEFT adapter directory or DnD <step>.safetensors file")
    enc.add_argument("out", help="output .safetensors; tokens are stored under the key 'tokens' (N_tok, H, W)")
    enc.set_defaults(func=run_encode)

    dec = actions.add_parser("decode", parents=[common, layout_args], help="tokens .safetensors -> PEFT adapter directory")
    dec.add_argument("tokens", help="safetensors file with a 'tokens' tensor (N_tok, H, W)")
    dec.add_argument("out_dir", help="output PEFT adapter directory")
    dec.add_argument("--base-model", default=None, help="recorded as base_model_name_or_path in adapter_config.json")
    dec.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    dec.set_defaults(func=run_decode)


def _layout(args):
    from ..lora.layout import get_layout

    return get_layout(args.layout, rank=args.rank, alpha=args.alpha)


def run_encode(args) -> int:
    from safetensors.torch import save_file

    from ..atomic import atomic_path
    from ..lora.adapters import load_adapter
    from ..lora.tokens import lora_to_tokens

    layout = _layout(args)
    adapter = load_adapter(args.adapter, layout)
    tokens = lora_to_tokens(adapter.state_dict, layout)
    with atomic_path(args.out) as tmp:
        save_file({"tokens": tokens.contiguous()}, str(tmp), metadata={"layout": json.dumps(layout.to_dict())})
    print(f"{args.out}: tokens {tuple(tokens.shape)} (layout {layout.name})")
    return 0


def run_decode(args) -> int:
    import torch

    from ..errors import AdapterError
    from ..lora.adapters import read_safetensors, save_peft_adapter
    from ..lora.tokens import tokens_to_lora
    from ..models.registry import DTYPES

    layout = _layout(args)
    tensors = read_safetensors(args.tokens)
    if "tokens" not in tensors:
        raise AdapterError(f"{args.tokens}: no tensor named 'tokens' (found {sorted(tensors)[:5]})")
    tokens = tensors["tokens"].float()
    expected = (layout.num_tokens, *layout.token_size)
    if tuple(tokens.shape) != expected:
        raise AdapterError(f"{args.tokens}: tokens have shape {tuple(tokens.shape)}, layout {layout.name!r} expects {expected}")
    state_dict = tokens_to_lora(tokens, layout)
    bad = next((k for k, v in state_dict.items() if not bool(torch.isfinite(v).all())), None)
    if bad:
        raise AdapterError(f"{args.tokens}: tokens decode to non-finite values in {bad}")
    save_peft_adapter(state_dict, args.out_dir, layout, base_model_name_or_path=args.base_model, dtype=DTYPES[args.dtype])
    print(f"{Path(args.out_dir)}: PEFT adapter (r {layout.rank}, alpha {layout.alpha:g}, {len(layout.targets)} targets)")
    return 0
