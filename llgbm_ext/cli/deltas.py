"""``llgbm deltas``: compute and cache teacher deltas of adapter files; optionally summarise them."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("deltas", parents=[common], help="compute and cache the deltas of adapters (PEFT dirs, DnD folders)")
    p.add_argument("--base-model", required=True, help="'tiny', 'smollm2-135m', a model directory or a cached hub id")
    p.add_argument("--adapters", nargs="+", required=True,
                   help="PEFT adapter dirs, DnD <step>.safetensors files, or folders of either")
    p.add_argument("--probes", default="generic", help="generic | domain:math|code|commonsense | a JSON file")
    p.add_argument("--out", required=True, help="delta cache directory (manifest.json, base_activation.npy, <id>.npy)")
    p.add_argument("--layout", default=None, help="LoRA layout (default: derived from the base model and the adapters' rank)")
    p.add_argument("--chat-template", action="store_true", help="wrap probes in the tokenizer's chat template")
    p.add_argument("--layer", type=int, default=-1, help="hidden-state index; -1 = final norm output (default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base model dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="adapters per forward")
    p.add_argument("--summary", action="store_true", help="print norms and task cosines, write delta_map.png and delta_cosines.png")
    p.add_argument("--map", default="pca", choices=["pca", "tsne"], help="2-D map method for --summary")
    p.set_defaults(func=run)


def _rank_of(path: Path) -> tuple[int, float | None]:
    """(rank, alpha) of an adapter from its config, else from a lora_A tensor's shape."""
    from ..lora.adapters import CONFIG_NAME, load_adapter

    config_file = path / CONFIG_NAME if path.is_dir() else None
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        if "r" in config:
            return int(config["r"]), config.get("lora_alpha")
    state = load_adapter(path).state_dict
    return next(v.shape[0] for k, v in state.items() if ".lora_A." in k), None


def run(args) -> int:
    import numpy as np

    from ..data.adapter_tasks import adapter_task
    from ..delta.cache import DeltaCache
    from ..delta.deltas import DeltaComputer
    from ..delta.probes import get_probe_set
    from ..delta.summary import format_summary, plot_summary
    from ..delta.teacher import cached_teacher_deltas, delta_context
    from ..lora.adapters import list_adapters
    from ..lora.layout import get_layout, layout_from_config
    from ..models.registry import load_base_model, resolve_base_model

    paths = [p for spec in args.adapters for p in list_adapters(spec)]
    probes = get_probe_set(args.probes, chat_template=True if args.chat_template else None)
    model_dir = resolve_base_model(args.base_model)
    if args.layout:
        layout = get_layout(args.layout)
    else:
        rank, alpha = _rank_of(paths[0])
        layout = layout_from_config(model_dir, rank=rank, alpha=alpha, name=str(args.base_model))
    model, tokenizer = load_base_model(model_dir, dtype=args.dtype, device=args.device)
    computer = DeltaComputer(model, tokenizer, layout, probes, layer=args.layer)
    cache = DeltaCache(args.out)
    context = delta_context(computer, args.base_model, model_dir)
    tasks = [adapter_task(p)[0] for p in paths]
    deltas = cached_teacher_deltas(computer, cache, context, paths, tasks, batch_size=args.batch_size).numpy()
    print(f"{args.out}: {len(paths)} deltas (H = {deltas.shape[1]}), probes {probes.name} ({probes.hash}), "
          f"base |v| = {float(np.linalg.norm(computer.base_activation.cpu().numpy())):.3f}")
    if args.summary:
        print(format_summary([str(p) for p in paths], tasks, deltas))
        for png in plot_summary(deltas, tasks, args.out, args.map):
            print(f"wrote {png}")
    return 0
