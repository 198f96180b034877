"""``llgbm demo``: the main job on the embedded default, end to end with the stages that exist.

Stages now: create the tiny base model; derive its LoRA layout; write a seeded random adapter as a
PEFT directory and as a DnD flat file; tokenize it into DnD tokens and decode them back; load the
decoded adapter with PEFT into the base model and check that its forward equals the original
adapter's. Teachers, generator training and evaluation are not implemented yet.
"""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the pipeline on the embedded tiny model")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _peft_logits(model_dir: Path, adapter_dir: Path, input_ids):
    import torch
    from peft import PeftModel

    from ..models.registry import load_base_model

    base, _ = load_base_model(model_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids).logits


def run(args) -> int:
    import torch

    from ..lora.adapters import load_adapter, save_dnd_checkpoint, save_peft_adapter
    from ..lora.factors import random_factors, state_dict_from_factors
    from ..lora.layout import get_layout, layout_from_config
    from ..lora.tokens import lora_to_tokens, tokens_to_lora
    from ..models.registry import load_base_model, resolve_base_model

    out = Path(args.out)
    model_dir = resolve_base_model("tiny")
    layout = get_layout("tiny")
    assert layout_from_config(model_dir, name="tiny") == layout, "tiny model and 'tiny' layout disagree"
    print(f"[1/5] base model 'tiny': {model_dir}")
    print(f"      layout: {layout.num_tokens} DnD tokens of {layout.token_size}, rank {layout.rank}, chunk {layout.chunk}")

    g = torch.Generator().manual_seed(args.seed)
    state_dict = state_dict_from_factors(random_factors(layout, generator=g, std=0.05), layout)
    save_peft_adapter(state_dict, out / "adapters" / "random_0", layout, base_model_name_or_path=str(model_dir))
    save_dnd_checkpoint(state_dict, out / "dnd" / "random" / "0.safetensors", layout)
    print(f"[2/5] random adapter written as PEFT dir {out / 'adapters' / 'random_0'} and DnD file {out / 'dnd/random/0.safetensors'}")

    tokens = lora_to_tokens(load_adapter(out / "dnd" / "random" / "0.safetensors", layout).state_dict, layout)
    decoded = tokens_to_lora(tokens, layout)
    err = max((decoded[k] - v).abs().max().item() for k, v in state_dict.items())
    save_peft_adapter(decoded, out / "adapters" / "decoded_0", layout, base_model_name_or_path=str(model_dir))
    print(f"[3/5] tokenized to {tuple(tokens.shape)} and decoded back: max abs round-trip error {err:.2e}")

    _, tokenizer = load_base_model(model_dir)
    ids = tokenizer(["Below is an instruction that describes a task."], return_tensors="pt").input_ids
    base, _ = load_base_model(model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
    original = _peft_logits(model_dir, out / "adapters" / "random_0", ids)
    roundtrip = _peft_logits(model_dir, out / "adapters" / "decoded_0", ids)
    print(f"[4/5] PEFT loaded both adapters: adapter changes logits by {(original - base_logits).abs().max():.3f}, "
          f"decoded vs original differ by {(roundtrip - original).abs().max():.2e}")
    print("[5/5] not implemented yet: teacher training, delta supervision, generator training, evaluation")
    return 0
