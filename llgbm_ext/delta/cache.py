"""DeltaCache: teacher deltas, other teacher-side targets and base activations on disk, keyed by adapter
content and context.

A teacher delta Δ = v(adapter) − v(base) depends on the adapter's tensors and on a *context*: the base
model (weights, config, tokenizer), the probe set and the delta settings (layer, dtype, chat template,
max length, padding ...). A lookup is ``(adapter_id, context) -> array``: a changed base, probe set or setting is a
miss, never a wrong hit.

Shapes: every array of a context (its adapter entries and its base activation) is float32 of the
context's ``shape``, fixed by the first array written to it and recorded in the manifest: (H,) for one
mean delta per adapter, (P, H) for per-probe deltas (one row per probe text), (M, 2k) for a teacher's
top-k log-probabilities. Another shape in the same context is refused, so a reader never mixes them.

Layout: LLGBM's file names, so a single-context cache looks like LLGBM's ``deltas/``::

    <root>/manifest.json                      contexts and records (JSON)
    <root>/base_activation.npy                v(base), float32 of the context's shape, of the primary context
    <root>/<adapter_id>.npy                   the entry of one adapter (e.g. Δ), in the primary context
    <root>/base_activation.<context_id>.npy   the same two for every further context
    <root>/<adapter_id>.<context_id>.npy
    <root>/.lock                              flock'ed: shared by readers, exclusive by writers

The primary context is the first one written to the directory (fixed in its manifest). It keeps the
plain names; every later context adds its id to the same names, so one directory, manifest and lock
serve any number of base models and probe sets. Arrays are written with ``np.save`` and read with
``allow_pickle=False``. The manifest records, per context, the base model (name and fingerprint),
the probe hash, the settings and the shape; per array, its context, shape, norm and checksum, plus
the adapter's path and task for people (never used for matching).

Base model: ``model_fingerprint`` of its directory hashes every byte of its weights and of its config,
tokenizer and chat-template files, so a model changed in place (same path, size and mtime) is another
context, in any process. Within one process a file is hashed once while its (inode, size, mtime,
ctime) stay the same. Contexts written when the fingerprint sampled 4 KiB blocks of the weights are
never matched again (their ids differ); their entries are misses, recomputed under the new context.

Format history: ``llgbm_ext.delta_cache/1`` stored one mean delta (H,) per adapter and recorded a
``hidden_size`` per context. ``llgbm_ext.delta_cache/2`` records a ``shape`` per context instead, so it
holds per-probe entries and other targets. A format-1 directory is refused with a one-line CacheError
on any read or write, never silently replaced: its mean deltas cannot serve per-probe training.

Fixes to LLGBM's DeltaCache (contract §6.23): its ids were the md5 of the adapter *path string*, so a
relative and an absolute path missed each other, and ``get_delta_for_checkpoint`` matched substrings
(``arc_e_001`` hit ``arc_e_0010``). Here ``adapter_id`` hashes the adapter tensors and lookups are exact.
LLGBM also recorded no base-model or probe identity, so a delta for another base model or probe set was
reused silently; here those are part of the key.

Safety: files are written to a temporary name and renamed into place (``llgbm_ext.atomic``) while the
writer holds the exclusive lock, so concurrent processes never lose entries and readers never see a
half-written file. A killed writer leaves at most a ``.*.tmp`` file (ignored, removed by the next
writer) or an array the manifest does not reference (ignored, removed by ``verify``). A record that
fails its checks (missing, truncated or pickled file, wrong dtype or shape, NaN/Inf, checksum
mismatch, stale context) is reported in a one-line warning naming the file, dropped from the manifest
and treated as a miss, so the caller recomputes it. A corrupt or unknown manifest is reported and
replaced by an empty one. The lock is ``fcntl.flock``: keep the cache on a local file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..atomic import atomic_path, write_text
from ..errors import LLGBMError, ModelError

FORMAT = "llgbm_ext.delta_cache/2"
FORMAT_1 = "llgbm_ext.delta_cache/1"  # one mean delta (H,) per adapter; refused
MANIFEST = "manifest.json"
BASE_ACTIVATION = "base_activation"
LOCK = ".lock"
ID_CHARS = 20  # hex digits of sha256 kept in adapter ids and fingerprints (80 bits)
CONTEXT_CHARS = 16  # hex digits of sha256 kept in context ids
# files of a model directory that model_fingerprint hashes besides its *.safetensors weights (not, e.g.,
# generation_config.json or a README, which do not change activations)
CONFIG_PATTERNS = ("config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "*.model", "chat_template.*", "*.safetensors.index.json")
_CHUNK = 1 << 20  # bytes per read when model_fingerprint hashes a file
_FILE_DIGESTS: dict[str, tuple[tuple[int, ...], bytes]] = {}  # real path -> (stat key, sha256); this process only
_ADAPTER_ID = re.compile(r"[0-9a-f]{8,64}")
_STEM = re.compile(r"(base_activation|[0-9a-f]{8,64})(\.[0-9a-f]{16})?")


class CacheError(LLGBMError):
    """A value given to the DeltaCache is unusable (bad id, non-float32 or non-finite array, shape mismatch),
    or its directory holds a cache of an older format."""


# ---------------------------------------------------------------------------------------------------
# Identities: adapters, base models, contexts


def _raw_bytes(name: str, value: torch.Tensor | np.ndarray) -> tuple[str, np.ndarray]:
    """(dtype name, raw bytes as a flat uint8 array) of a tensor or array; no copy for contiguous CPU data."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        # bf16 has no numpy dtype, so hash the bytes through a uint8 view
        return str(t.dtype).removeprefix("torch."), t.reshape(-1).view(torch.uint8).numpy()
    a = np.ascontiguousarray(value)
    if a.dtype.hasobject:
        raise CacheError(f"{name}: an object array has no raw bytes to hash")
    return a.dtype.name, a.reshape(-1).view(np.uint8)


def _hash_tensors(state_dict: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """sha256 of names, dtypes, shapes and every byte of the tensors, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        dtype, raw = _raw_bytes(key, value)
        h.update(json.dumps([key, dtype, list(value.shape)]).encode())  # fixes the length of the bytes that follow
        h.update(raw)
    return h.hexdigest()[:ID_CHARS]


def adapter_id(state_dict: Mapping[str, torch.Tensor | np.ndarray], scaling: float | None = None) -> str:
    """Content id of an adapter: sha256 of its key names, dtypes, shapes and raw bytes, in sorted key order.

    The same tensors get the same id wherever they are stored; any changed element, key, shape or dtype
    gives another id. (LLGBM hashed the path string, contract §6.23.) Pass the state dict of
    ``load_adapter`` so a PEFT directory and a DnD file of one adapter share their canonical keys, and
    the LoRA ``scaling`` the delta is computed with: it lives in adapter_config.json, not in the tensors.
    """
    if not state_dict:
        raise CacheError("adapter_id: empty state dict")
    tensors = _hash_tensors(state_dict)
    if scaling is None:
        return tensors
    return hashlib.sha256(f"{tensors} scaling={float(scaling)!r}".encode()).hexdigest()[:ID_CHARS]


def _check_safetensors(f: BinaryIO, size: int, file: Path) -> None:
    """A one-line ModelError naming ``file`` unless the open file starts with a safetensors header."""
    try:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size}")
        if not isinstance(json.loads(f.read(header_len)), dict):
            raise TypeError("its header is not a JSON object")
    except (struct.error, ValueError, TypeError) as e:
        raise ModelError(f"{file}: not a readable safetensors file ({e})") from None
    f.seek(0)


def _read_digest(f: BinaryIO) -> bytes:
    """sha256 of an open file from its position to its end, read in ``_CHUNK`` blocks."""
    h, buffer = hashlib.sha256(), bytearray(_CHUNK)
    view = memoryview(buffer)
    while n := f.readinto(buffer):
        h.update(view[:n])
    return h.digest()


def _file_digest(file: Path, safetensors: bool) -> bytes:
    """sha256 of every byte of ``file`` (a safetensors header checked first); remembered in this process
    only, while the file's (device, inode, size, mtime, ctime) stay the same."""
    real = os.path.realpath(file)  # hub snapshots link to blobs: one entry per stored file
    try:
        with open(real, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())  # taken before reading: a write during the read changes it, so it is read again
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            known = _FILE_DIGESTS.get(real)
            if known is not None and known[0] == key:
                return known[1]
            if safetensors:
                _check_safetensors(f, st.st_size, file)
            digest = _read_digest(f)
    except OSError as e:
        raise ModelError(f"{file}: cannot read it to fingerprint ({e.strerror or e})") from None
    _FILE_DIGESTS[real] = (key, digest)
    return digest


def _fingerprint_files(path: Path) -> str:
    """Fingerprint of one safetensors file, or of a model directory's weights and ``CONFIG_PATTERNS`` files."""
    if path.is_file():
        weights, configs = [path], []
    else:
        weights = sorted(path.glob("*.safetensors"))
        configs = sorted({f for pattern in CONFIG_PATTERNS for f in path.glob(pattern) if f.is_file()})
    if not weights:
        raise ModelError(f"{path}: no *.safetensors weights to fingerprint")
    h = hashlib.sha256()
    for file in weights + configs:
        h.update(f"{file.name}\0{_file_digest(file, safetensors=file in weights).hex()}\n".encode())
    return h.hexdigest()[:ID_CHARS]


def model_fingerprint(source: str | os.PathLike | torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Fingerprint of a base model, from its directory (or one safetensors file), module or state dict.

    A directory's covers every byte that determines the model's activations: each ``*.safetensors`` file
    whole (header and data) and the files transformers builds the model and its tokenizer from
    (``CONFIG_PATTERNS``: config, tokenizer, chat template, shard index), with their names. Any change is
    another fingerprint, also one made in place with the file's size and mtime kept. It costs one sha256
    pass over the weights (sha256 beats blake2b on CPUs with SHA instructions; both are measured, with the
    fingerprint's cost against a base forward, by benchmarks/fingerprint.py); within one process a file
    whose (device, inode, size, mtime, ctime) did not change is not read again, and a new process reads
    every byte. A module or state dict hashes every tensor's name, dtype, shape and bytes (weights only).
    The two forms differ, so fingerprint a context's base the same way every time (the directory from
    ``resolve_base_model`` needs no loaded model).
    """
    if isinstance(source, (str, os.PathLike)):
        return _fingerprint_files(Path(source))
    if isinstance(source, torch.nn.Module):
        source = source.state_dict()
    if not source:
        raise CacheError("model_fingerprint: empty state dict")
    return _hash_tensors(source)


def _context_id(record: Mapping[str, Any]) -> str:
    """Id of a context from its fingerprint, probe hash and settings (not the base model's name or path)."""
    key = {"format": FORMAT, **{k: record[k] for k in ("fingerprint", "probe_hash", "settings")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:CONTEXT_CHARS]


@dataclass(frozen=True)
class DeltaContext:
    """What a delta depends on besides the adapter; its ``id`` keys the cache.

    ``base_model`` is recorded for people and is not part of the id: the same weights under another
    path or name are the same context, other weights under the same name are not.
    """

    base_model: str  # name or directory of the base model, as given by the user
    fingerprint: str  # model_fingerprint() of its weights
    probe_hash: str  # hash of the probe set (texts, template, truncation)
    settings: dict[str, Any] = field(default_factory=dict)  # layer, dtype, chat template, max length, padding ...

    def __post_init__(self) -> None:
        for name in ("base_model", "fingerprint", "probe_hash"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise CacheError(f"DeltaContext.{name}: expected a non-empty string, got {value!r}")
        if not isinstance(self.settings, Mapping):
            raise CacheError(f"DeltaContext.settings: expected a dict, got {type(self.settings).__name__}")
        try:  # canonical JSON form, so a context read back from the manifest compares equal
            settings = json.loads(json.dumps(dict(self.settings), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CacheError(f"DeltaContext.settings: not JSON-serialisable ({e})") from None
        object.__setattr__(self, "settings", settings)

    @functools.cached_property
    def id(self) -> str:
        return _context_id(self.record())

    def record(self) -> dict[str, Any]:
        """The context as stored in the manifest."""
        return {"base_model": self.base_model, "fingerprint": self.fingerprint,
                "probe_hash": self.probe_hash, "settings": self.settings}

    def __hash__(self) -> int:
        return hash(self.id)


@dataclass(frozen=True)
class CacheEntry:
    """One cached adapter entry (a delta or another target), for summaries; ``norm``: L2 over all its elements."""

    adapter_id: str
    path: str | None
    task: str | None
    norm: float
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# Arrays and manifest


def _float32(values: torch.Tensor | np.ndarray, what: str, min_ndim: int) -> np.ndarray:
    """``values`` as a float32 numpy array of ≥ ``min_ndim`` non-empty dims, else a CacheError naming ``what``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype != torch.float32:
            raise CacheError(f"{what}: dtype {values.dtype}, expected torch.float32 (cast it explicitly)")
        values = values.numpy()
    array = np.asarray(values)
    if array.dtype != np.float32:
        raise CacheError(f"{what}: dtype {array.dtype}, expected float32 (cast it explicitly)")
    if array.ndim < min_ndim or 0 in array.shape:
        expected = "a shape of at least one dimension" if min_ndim == 1 else "(N, *shape)"
        raise CacheError(f"{what}: shape {array.shape}, expected {expected} with no empty dimension")
    return array


def _valid_shape(shape: Any) -> bool:
    """Whether a manifest's ``shape`` is a non-empty list of positive ints."""
    return isinstance(shape, list) and bool(shape) and all(type(n) is int and n > 0 for n in shape)


def _checksum(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def _stem(name: str, ctx_id: str, manifest: dict) -> str:
    """File stem of an array: LLGBM's plain name in the primary context, ``<name>.<context_id>`` otherwise."""
    return name if manifest["primary_context"] == ctx_id else f"{name}.{ctx_id}"


def _empty_manifest() -> dict:
    return {"format": FORMAT, "primary_context": None, "contexts": {}, "base_activations": {}, "adapters": {}}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DeltaCache:
    """Teacher deltas and base activations of any number of contexts in one directory (layout: module doc).

    Reads: ``get``, ``get_many``, ``missing``, ``get_base_activation``, ``entries``. Writes: ``put``,
    ``put_many``, ``put_base_activation``. Maintenance: ``verify``. ``get`` reads the whole manifest,
    so use ``get_many`` / ``put_many`` for thousands of adapters (one manifest read or write per call).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._swept = False  # leftover temporary files removed once per instance, on its first write

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, adapter_id: str, ctx: DeltaContext) -> np.ndarray | None:
        """The cached entry of an adapter in a context, float32 of the context's shape; None on a miss."""
        return self.get_many([adapter_id], ctx).get(adapter_id)

    def get_many(self, adapter_ids: Iterable[str], ctx: DeltaContext) -> dict[str, np.ndarray]:
        """Cached entries {adapter_id: array of the context's shape} of the given adapters; misses are left out."""
        return self._read("adapters", list(adapter_ids), ctx)

    def missing(self, adapter_ids: Iterable[str], ctx: DeltaContext) -> list[str]:
        """The adapter ids (in the given order) that have no valid entry in ``ctx``: the ones to compute."""
        adapter_ids = list(adapter_ids)
        hits = self.get_many(adapter_ids, ctx)
        return [a for a in adapter_ids if a not in hits]

    def get_base_activation(self, ctx: DeltaContext) -> np.ndarray | None:
        """The cached base activation v(base) of a context, float32 of its shape; None on a miss."""
        return self._read("base_activations", [BASE_ACTIVATION], ctx).get(BASE_ACTIVATION)

    def entries(self, ctx: DeltaContext) -> list[CacheEntry]:
        """The adapter entries recorded for ``ctx`` (from the manifest; arrays are checked when read)."""
        with self._lock(exclusive=False):
            manifest, _ = self._load_manifest()
        return [CacheEntry(r.get("adapter_id"), r.get("path"), r.get("task"), r.get("norm"),
                           tuple(r.get("shape", ()))) for r in manifest["adapters"].values() if r["context"] == ctx.id]

    # -- writes --------------------------------------------------------------------------------------

    def put(self, adapter_id: str, ctx: DeltaContext, array: torch.Tensor | np.ndarray,
            path: str | os.PathLike | None = None, task: str | None = None) -> None:
        """Store the entry of one adapter, float32 of any shape with ≥1 dims: (H,) a mean delta, (P, H) per-probe
        deltas ... (the context's shape once set); ``path`` and ``task`` are recorded for people."""
        array = _float32(array, f"entry of adapter {adapter_id}", min_ndim=1)
        self.put_many([adapter_id], ctx, array[None], paths=[path], tasks=[task])

    def put_many(self, adapter_ids: Sequence[str], ctx: DeltaContext, arrays: torch.Tensor | np.ndarray,
                 paths: Sequence[str | os.PathLike | None] | None = None,
                 tasks: Sequence[str | None] | None = None) -> None:
        """Store the entries (N, *shape) float32 of N adapters of one context, with a single manifest update."""
        arrays = _float32(arrays, "put_many arrays", min_ndim=2)
        paths = [None] * len(adapter_ids) if paths is None else list(paths)
        tasks = [None] * len(adapter_ids) if tasks is None else list(tasks)
        if not len(adapter_ids) == len(arrays) == len(paths) == len(tasks):
            raise CacheError(f"put_many: {len(adapter_ids)} ids, {len(arrays)} arrays, {len(paths)} paths, "
                             f"{len(tasks)} tasks; expected one of each per adapter")
        for aid in adapter_ids:
            if not isinstance(aid, str) or not _ADAPTER_ID.fullmatch(aid):
                raise CacheError(f"adapter id {aid!r}: expected the lowercase hex string of adapter_id()")
        finite = np.isfinite(arrays).reshape(len(arrays), -1).all(axis=1)
        if not finite.all():
            raise CacheError(f"entry of adapter {adapter_ids[int(np.argmin(finite))]}: contains NaN or Inf")
        records = {aid: {"adapter_id": aid, "path": None if p is None else str(p),
                         "task": None if t is None else str(t)}
                   for aid, p, t in zip(adapter_ids, paths, tasks)}
        self._write("adapters", ctx, dict(zip(adapter_ids, arrays)), records)

    def put_base_activation(self, ctx: DeltaContext, activation: torch.Tensor | np.ndarray) -> None:
        """Store the base activation v(base) of a context, float32 of the context's shape ((H,), (P, H) ...)."""
        activation = _float32(activation, "base activation", min_ndim=1)
        if not np.isfinite(activation).all():
            raise CacheError("base activation: contains NaN or Inf")
        self._write("base_activations", ctx, {BASE_ACTIVATION: activation}, {BASE_ACTIVATION: {}})

    # -- maintenance ---------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Check every record and file; drop bad records and remove leftover files. Returns one line per problem."""
        if not self.root.is_dir():
            return []
        with self._lock(exclusive=True):
            manifest, problems = self._load_manifest()
            for section in ("base_activations", "adapters"):
                for stem, record in list(manifest[section].items()):
                    _, reason = self._load_record(stem, record, manifest)
                    if reason:
                        problems.append(self._drop(manifest, section, stem, reason))
            kept = {f"{stem}.npy" for section in ("base_activations", "adapters") for stem in manifest[section]}
            for file in sorted(self.root.glob("*.npy")):
                if file.name not in kept and _STEM.fullmatch(file.stem):  # other .npy files are not ours
                    file.unlink()
                    problems.append(f"{file}: not referenced by the manifest; removed")
            problems += self._sweep()
            self._write_manifest(manifest)
        return problems

    # -- internals -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Hold ``<root>/.lock``: shared for reads, exclusive for writes. A missing root is read without it."""
        if not exclusive and not self.root.is_dir():
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load_manifest(self) -> tuple[dict, list[str]]:
        """The manifest without unusable parts, and one line per part left out (corrupt file, stale context).

        A format-1 manifest raises a CacheError: replacing it would discard a cache someone may still use."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return _empty_manifest(), []
        except (OSError, ValueError) as e:
            return _empty_manifest(), [f"{path}: unreadable or not JSON ({_first_line(e)}); started a fresh manifest"]
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT_1:
            raise CacheError(f"{path}: a delta cache of format {FORMAT_1} (one mean delta per adapter); this version "
                             f"stores per-probe entries: delete {self.root} or use another cache directory")
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and all(isinstance(manifest.get(k), dict) for k in ("contexts", "base_activations", "adapters"))
                and isinstance(manifest.get("primary_context"), (str, type(None)))):
            return _empty_manifest(), [f"{path}: not a {FORMAT} manifest; started a fresh manifest"]
        problems, stale = [], set()
        for ctx_id, record in list(manifest["contexts"].items()):
            try:
                valid = _context_id(record) == ctx_id and _valid_shape(record["shape"])
            except (KeyError, TypeError):
                valid = False
            if not valid:
                del manifest["contexts"][ctx_id]
                stale.add(ctx_id)
                problems.append(f"{path}: context {ctx_id} does not match its recorded fingerprint, probe hash or "
                                f"settings, or has no valid shape; dropped it and its arrays, they will be recomputed")
        for section in ("base_activations", "adapters"):
            for stem, record in list(manifest[section].items()):
                ctx_id = record.get("context") if isinstance(record, dict) else None
                if ctx_id not in manifest["contexts"]:
                    del manifest[section][stem]
                    if ctx_id not in stale:
                        problems.append(f"{self.root / f'{stem}.npy'}: its context {ctx_id} is not in the "
                                        f"manifest; dropped, it will be recomputed")
        return manifest, problems

    def _load_record(self, stem: str, record: dict, manifest: dict,
                     ctx_id: str | None = None) -> tuple[np.ndarray | None, str | None]:
        """Load and check the array of one record (of context ``ctx_id`` if given): (array, None) or (None, why not)."""
        if ctx_id is not None and record["context"] != ctx_id:
            return None, f"recorded for context {record['context']}, not {ctx_id}"
        if not _STEM.fullmatch(stem) or not isinstance(record.get("sha256"), str):
            return None, "malformed manifest record"
        expected = tuple(manifest["contexts"][record["context"]]["shape"])
        file = self.root / f"{stem}.npy"
        try:
            with open(file, "rb") as f:
                array = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            return None, "file is missing"
        except (OSError, ValueError, EOFError) as e:
            return None, f"not a readable .npy file ({_first_line(e)})"
        if not isinstance(array, np.ndarray):
            return None, "not a .npy array"
        if array.dtype != np.float32 or array.shape != expected:
            return None, f"holds {array.dtype} {array.shape}, expected float32 {expected}"
        if not np.isfinite(array).all():
            return None, "contains NaN or Inf"
        if _checksum(array) != record["sha256"]:
            return None, "content does not match its recorded checksum"
        return array, None

    def _drop(self, manifest: dict, section: str, stem: str, reason: str) -> str:
        """Remove a bad record and its file (if its name is ours); returns the report line."""
        del manifest[section][stem]
        file = self.root / f"{stem}.npy"
        if _STEM.fullmatch(stem):
            file.unlink(missing_ok=True)
        return f"{file}: {reason}; dropped, it will be recomputed"

    def _read(self, section: str, names: list[str], ctx: DeltaContext) -> dict[str, np.ndarray]:
        """Checked arrays {name: array} of ``ctx`` in a manifest section; bad records are reported and dropped."""
        hits, bad = {}, {}
        with self._lock(exclusive=False):
            manifest, problems = self._load_manifest()
            if ctx.id not in manifest["contexts"]:
                names = []  # nothing was ever stored for this context
            for name in names:
                stem = _stem(name, ctx.id, manifest)
                record = manifest[section].get(stem)
                if record is None:
                    continue
                array, reason = self._load_record(stem, record, manifest, ctx.id)
                if reason is None:
                    hits[name] = array
                else:
                    bad[stem] = (record, reason)
        if problems or bad:
            self._repair(section, bad)
        return hits

    def _repair(self, section: str, bad: dict[str, tuple[Any, str]]) -> None:
        """Drop the bad records of a read (if no one replaced them meanwhile) and what _load_manifest left out."""
        with self._lock(exclusive=True):
            manifest, problems = self._load_manifest()
            for stem, (record, reason) in bad.items():
                if manifest[section].get(stem) == record:
                    problems.append(self._drop(manifest, section, stem, reason))
            self._warn(problems)
            if problems:
                self._write_manifest(manifest)

    def _write(self, section: str, ctx: DeltaContext, arrays: dict[str, np.ndarray],
               records: dict[str, dict]) -> None:
        """Write arrays {name: array} of one shape and their records for ``ctx``, then the manifest, under the
        exclusive lock; the first array of a context fixes its shape."""
        shape = next(iter(arrays.values())).shape
        with self._lock(exclusive=True):
            manifest, problems = self._load_manifest()
            self._warn(problems)
            if not self._swept:
                self._warn(self._sweep())
                self._swept = True
            context = manifest["contexts"].setdefault(ctx.id, {**ctx.record(), "shape": list(shape)})
            if tuple(context["shape"]) != shape:
                raise CacheError(f"{section} of shape {shape} for context {ctx.id} ({ctx.base_model}), which stores "
                                 f"shape {tuple(context['shape'])}: every array of a context has its shape")
            if manifest["primary_context"] is None:
                manifest["primary_context"] = ctx.id
            for name, array in arrays.items():
                stem = _stem(name, ctx.id, manifest)
                with atomic_path(self.root / f"{stem}.npy", fsync=False) as tmp, open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                manifest[section][stem] = {**records[name], "context": ctx.id, "shape": list(shape),
                                           "norm": float(np.linalg.norm(array)), "sha256": _checksum(array)}
            self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict) -> None:
        # one line: json's C encoder skips indented output, which is 3x slower on large manifests
        write_text(self.root / MANIFEST, json.dumps(manifest, sort_keys=True) + "\n")

    def _sweep(self) -> list[str]:
        """Remove temporary files of killed writers; only called under the exclusive lock, when none is live."""
        lines = []
        for tmp in sorted(self.root.glob(".*.tmp")):
            tmp.unlink(missing_ok=True)
            lines.append(f"{tmp}: temporary file of an interrupted write; removed")
        return lines

    def _warn(self, lines: list[str]) -> None:
        for line in lines:
            warnings.warn(f"delta cache: {line}")
