"""``llgbm criterion-weights FOLDER... --layout L --out DIR``: DnD's per-token criterion weights."""

from __future__ import annotations

from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser(
        "criterion-weights", parents=[common],
        help="per-token weights of DnD's token MSE from folders of checkpoints (criterion_weight.pt)",
    )
    p.add_argument("folders", nargs="+", help="training folders of DnD <step>.safetensors files (or PEFT dirs)")
    p.add_argument("--layout", required=True, help="layout name or model directory")
    p.add_argument("--out", required=True,
                   help="output folder: <out>/<folder name>/criterion_weight.pt per folder, and "
                        "<out>/criterion_weight.pt = their mean")
    p.add_argument("--limit", type=int, default=None, help="use the first N steps of each folder (DnD: 50 or 80)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lora.criterion_weights import (
        FILE_NAME,
        folder_criterion_weights,
        mean_criterion_weight,
        save_criterion_weight,
    )
    from ..lora.layout import get_layout

    layout = get_layout(args.layout)
    out = Path(args.out)
    saved = []
    for folder in args.folders:
        weights = folder_criterion_weights(folder, layout, args.limit)
        path = save_criterion_weight(weights, out / Path(folder).name / FILE_NAME)
        saved.append(path)
        print(f"{path}: {weights.shape[0]} weights, min {weights.min():.3f} max {weights.max():.3f} mean {weights.mean():.3f}")
    mean = save_criterion_weight(mean_criterion_weight(saved, layout), out / FILE_NAME)
    print(f"{mean}: mean of {len(saved)} folder(s)")
    return 0
