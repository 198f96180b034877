"""DeltaCache: content ids, context hits and misses, LLGBM layout, per-context shapes, format-1 refusal,
corrupt entries, concurrent and killed writers."""

import json
import multiprocessing
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llgbm_ext.delta.cache import (
    FORMAT,
    CacheError,
    DeltaCache,
    DeltaContext,
    adapter_id,
    model_fingerprint,
)
from llgbm_ext.errors import ModelError

H = 16
P = 3  # probes of per-probe entries
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SETTINGS = {"layer": -1, "dtype": "bfloat16", "chat_template": "chatml", "max_length": 128, "padding": "left"}


def context(**changes) -> DeltaContext:
    fields = dict(base_model="tiny", fingerprint="ab" * 10, probe_hash="cd" * 8, settings=SETTINGS)
    return DeltaContext(**{**fields, **changes})


def fake_adapter(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {KEY_A: torch.randn(4, H, generator=g).to(dtype), KEY_B: torch.randn(H, 4, generator=g).to(dtype)}


def fake_delta(seed: int, shape: tuple[int, ...] = (H,)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def filled_cache(root, n: int = 3) -> tuple[DeltaCache, list[str]]:
    cache, ids = DeltaCache(root), [adapter_id(fake_adapter(i)) for i in range(n)]
    cache.put_base_activation(context(), fake_delta(100))
    for i, aid in enumerate(ids):
        cache.put(aid, context(), fake_delta(i), path=f"/adapters/task_{i}", task=f"task{i % 2}")
    return cache, ids


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- identities --------------------------------------------------------------------------------


def test_adapter_id_depends_on_tensors_not_path(tmp_path):
    sd = fake_adapter(0)
    for path in (tmp_path / "a" / "adapter_model.safetensors", tmp_path / "elsewhere" / "7.safetensors"):
        path.parent.mkdir()
        save_file(sd, str(path))
    first_path, second_path = sorted(tmp_path.glob("*/*.safetensors"))
    first, second = load_file(str(first_path)), load_file(str(second_path))
    assert adapter_id(first) == adapter_id(second) == adapter_id(sd)
    assert re.fullmatch(r"[0-9a-f]{20}", adapter_id(sd))
    assert adapter_id(dict(reversed(list(sd.items())))) == adapter_id(sd)  # key order does not matter
    assert adapter_id({k: v.numpy() for k, v in sd.items()}) == adapter_id(sd)  # numpy or torch alike

    changed = {k: v.clone() for k, v in sd.items()}
    changed[KEY_B][3, 1] += 1e-3
    assert adapter_id(changed) != adapter_id(sd)
    assert adapter_id({KEY_A: sd[KEY_A], KEY_B + "x": sd[KEY_B]}) != adapter_id(sd)  # key names count
    assert adapter_id({KEY_A: sd[KEY_A], KEY_B: sd[KEY_B].reshape(4, H)}) != adapter_id(sd)  # shapes count
    scaled = {adapter_id(sd, scaling=2.0), adapter_id(sd, scaling=0.5), adapter_id(sd)}
    assert len(scaled) == 3 and adapter_id(sd, scaling=2) == adapter_id(load_file(str(first_path)), scaling=2.0)


def test_adapter_id_bf16():
    sd = fake_adapter(0, torch.bfloat16)
    assert adapter_id(sd) == adapter_id({k: v.clone() for k, v in sd.items()})
    assert adapter_id(sd) != adapter_id({k: v.float() for k, v in sd.items()})  # same values, other dtype
    bumped = {k: v.clone() for k, v in sd.items()}
    bumped[KEY_A][0, 0] = bumped[KEY_A][0, 0] * 2 + 1
    assert adapter_id(bumped) != adapter_id(sd)
    with pytest.raises(CacheError):
        adapter_id({})


def _write_model_dir(path, tensors):
    path.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:1]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[1:]}, str(path / "model-00002-of-00002.safetensors"))


def test_model_fingerprint_of_directories(tmp_path):
    tensors = {"embed.weight": torch.randn(700, 1536), "norm.weight": torch.ones(1536)}  # 4 MiB: several reads
    _write_model_dir(tmp_path / "base", tensors)
    (tmp_path / "base" / "config.json").write_text('{"hidden_size": 1536}')
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    fp = model_fingerprint(tmp_path / "base")
    assert re.fullmatch(r"[0-9a-f]{20}", fp)
    assert fp == model_fingerprint(str(tmp_path / "copy"))  # content, not location

    _write_model_dir(tmp_path / "finetuned", {**tensors, "embed.weight": tensors["embed.weight"] * 1.01})
    assert model_fingerprint(tmp_path / "finetuned") != fp
    _write_model_dir(tmp_path / "half", {k: v.bfloat16() for k, v in tensors.items()})
    assert model_fingerprint(tmp_path / "half") != fp
    for i, position in enumerate((0, 350 * 1536 + 5, 700 * 1536 - 1)):  # one element, anywhere
        edited = tensors["embed.weight"].clone()
        edited.view(-1)[position] += 1e-3
        _write_model_dir(tmp_path / f"edited{i}", {**tensors, "embed.weight": edited})
        shutil.copy(tmp_path / "base" / "config.json", tmp_path / f"edited{i}")
        assert model_fingerprint(tmp_path / f"edited{i}") != fp

    # the files that shape activations count (config, tokenizer, chat template), others do not
    (tmp_path / "copy" / "config.json").write_text('{"hidden_size": 1536, "rms_norm_eps": 1e-5}')
    assert model_fingerprint(tmp_path / "copy") != fp
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "copy")
    (tmp_path / "copy" / "generation_config.json").write_text('{"temperature": 0.5}')
    (tmp_path / "copy" / "README.md").write_text("notes")
    assert model_fingerprint(tmp_path / "copy") == fp
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.txt", "spiece.model"):
        (tmp_path / "copy" / name).write_text("{}")
        changed = model_fingerprint(tmp_path / "copy")
        assert changed != fp, name
        (tmp_path / "copy" / name).write_text("{ }")
        assert model_fingerprint(tmp_path / "copy") != changed, name
        (tmp_path / "copy" / name).unlink()
    assert model_fingerprint(tmp_path / "copy") == fp
    # one safetensors file: its bytes alone
    single = tmp_path / "base" / "model-00001-of-00002.safetensors"
    assert model_fingerprint(single) == model_fingerprint(tmp_path / "copy" / single.name) != fp

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        model_fingerprint(tmp_path / "empty")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(ModelError, match="broken.safetensors: not a readable safetensors file"):
        model_fingerprint(tmp_path / "broken.safetensors")
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "model.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="model.safetensors: cannot read it"):
        model_fingerprint(tmp_path / "dangling")


def _count_reads(monkeypatch) -> list[int]:
    """A fresh memo (as in a new process) and a list that counts the files model_fingerprint reads."""
    from llgbm_ext.delta import cache as cache_module

    monkeypatch.setattr(cache_module, "_FILE_DIGESTS", {})
    reads, read = [0], cache_module._read_digest

    def counted(f):
        reads[0] += 1
        return read(f)

    monkeypatch.setattr(cache_module, "_read_digest", counted)
    return reads


def test_model_fingerprint_reads_a_file_once_per_process_and_every_byte_in_a_new_one(tmp_path, monkeypatch):
    from model_edits import change_weight_in_place

    tensors = {"embed.weight": torch.randn(300, 256), "norm.weight": torch.ones(256)}
    _write_model_dir(tmp_path / "m", tensors)
    (tmp_path / "m" / "config.json").write_text("{}")
    reads = _count_reads(monkeypatch)
    fp = model_fingerprint(tmp_path / "m")
    assert reads[0] == 3
    assert model_fingerprint(tmp_path / "m") == fp and reads[0] == 3  # nothing read again
    shard = tmp_path / "m" / "model-00001-of-00002.safetensors"  # embed.weight
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again, same bytes
    assert model_fingerprint(tmp_path / "m") == fp and reads[0] == 4
    shutil.copy2(shard, tmp_path / "new")
    os.replace(tmp_path / "new", shard)  # a copy renamed into place (another inode): read again
    assert model_fingerprint(tmp_path / "m") == fp and reads[0] == 5

    # one float changed in place, size, inode and mtime kept: a new process reads every byte and sees it
    change_weight_in_place(shard, "embed.weight", 150 * 256 + 77, 1e-3)
    reads = _count_reads(monkeypatch)
    assert model_fingerprint(tmp_path / "m") != fp and reads[0] == 3


def test_model_fingerprint_of_modules_and_state_dicts():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model.state_dict())
    assert fp == model_fingerprint({k: v.clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        model[0].weight[17, 3] += 1e-3  # one element of 4096: every one is hashed
    assert model_fingerprint(model) != fp
    assert model_fingerprint(model.bfloat16()) != model_fingerprint(model.float())


def test_base_model_changed_in_place_is_a_miss_and_served_fresh(tmp_path, no_warnings):
    """One float of a deep layer changed in place (size, inode and mtime kept): in a new process the cache
    misses and serves the Δ of the changed model, equal to a fresh computation."""
    from model_edits import change_weight_in_place

    from llgbm_ext.delta import cache as cache_module
    from llgbm_ext.delta.deltas import DeltaComputer
    from llgbm_ext.delta.probes import get_probe_set
    from llgbm_ext.delta.teacher import (
        adapter_ids,
        cached_teacher_deltas,
        delta_context,
    )
    from llgbm_ext.lora.adapters import save_peft_adapter
    from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
    from llgbm_ext.lora.layout import get_layout
    from llgbm_ext.models.registry import load_base_model, resolve_base_model

    base = tmp_path / "tiny"
    shutil.copytree(resolve_base_model("tiny"), base)  # never the shipped directory itself
    layout, g = get_layout("tiny"), torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"adapter{i}")
        state = state_dict_from_factors(random_factors(layout, generator=g, std=0.05), layout)
        save_peft_adapter(state, paths[-1], layout, base_model_name_or_path="tiny")
    cache, ids = DeltaCache(tmp_path / "cache"), adapter_ids(paths, layout)

    def run() -> tuple[DeltaComputer, DeltaContext, list[str], torch.Tensor]:
        """What a new process does: load the base, build its context, ask the cache (misses, then Δ)."""
        cache_module._FILE_DIGESTS.clear()
        model, tokenizer = load_base_model(base)
        computer = DeltaComputer(model, tokenizer, layout, get_probe_set("generic"))
        ctx = delta_context(computer, "tiny", base)
        missing = cache.missing(ids, ctx)
        return computer, ctx, missing, cached_teacher_deltas(computer, cache, ctx, paths, progress=False)

    _, before_ctx, missing, before = run()
    assert missing == ids
    _, ctx, missing, again = run()
    assert ctx == before_ctx and missing == [] and torch.equal(again, before)  # unchanged: a hit
    # element 104 lies between the 4 KiB blocks that a sampled fingerprint (as this cache once had) read
    change_weight_in_place(base / "model.safetensors", "model.layers.3.mlp.down_proj.weight", 104, 1.0)
    computer, ctx, missing, served = run()
    assert ctx != before_ctx and missing == ids
    fresh = computer.teacher_deltas(paths, progress=False)
    assert (fresh - before).abs().max() > 1e-2  # the change matters, so a stale hit would be caught
    torch.testing.assert_close(served, fresh, rtol=0, atol=1e-6)
    assert len(cache.entries(ctx)) == len(paths) and len(cache.entries(before_ctx)) == len(paths)


# --- round trip and layout ---------------------------------------------------------------------


def test_round_trip_in_llgbm_layout(tmp_path, no_warnings):
    cache, ids = filled_cache(tmp_path / "deltas")
    more = [adapter_id(fake_adapter(i)) for i in (10, 11)]
    cache.put_many(more, context(), torch.from_numpy(np.stack([fake_delta(10), fake_delta(11)])),
                   paths=["/p/10", "/p/11"], tasks=["t", "t"])

    reopened = DeltaCache(tmp_path / "deltas")  # another instance (or process) sees the same entries
    for seed, aid in [*enumerate(ids), (10, more[0]), (11, more[1])]:
        got = reopened.get(aid, context())
        assert got.dtype == np.float32 and np.array_equal(got, fake_delta(seed))
    assert np.array_equal(reopened.get_base_activation(context()), fake_delta(100))

    files = sorted(p.name for p in (tmp_path / "deltas").iterdir())
    assert files == sorted([".lock", "manifest.json", "base_activation.npy"] + [f"{a}.npy" for a in ids + more])
    assert np.array_equal(np.load(tmp_path / "deltas" / f"{ids[1]}.npy", allow_pickle=False), fake_delta(1))
    manifest = json.loads((tmp_path / "deltas" / "manifest.json").read_text())
    assert manifest["format"] == FORMAT == "llgbm_ext.delta_cache/2"
    assert manifest["adapters"][ids[0]]["path"] == "/adapters/task_0"
    assert manifest["adapters"][ids[0]]["shape"] == [H]
    assert manifest["contexts"][context().id]["settings"] == SETTINGS
    assert manifest["contexts"][context().id]["shape"] == [H]
    assert "hidden_size" not in manifest["contexts"][context().id]

    entries = {e.adapter_id: e for e in reopened.entries(context())}
    assert set(entries) == set(ids + more)
    assert entries[ids[2]].task == "task0" and entries[more[1]].path == "/p/11"
    assert entries[ids[1]].norm == pytest.approx(float(np.linalg.norm(fake_delta(1))))
    assert entries[ids[1]].shape == (H,)
    assert reopened.get_many([ids[0], "0" * 20], context()).keys() == {ids[0]}
    assert reopened.missing(["0" * 20, ids[0], "1" * 20], context()) == ["0" * 20, "1" * 20]
    assert reopened.verify() == []


def test_contexts_share_a_directory(tmp_path, no_warnings):
    cache, ids = filled_cache(tmp_path)
    other = context(probe_hash="ef" * 8)
    cache.put(ids[0], other, -fake_delta(0))
    cache.put_base_activation(other, -fake_delta(100))
    assert np.array_equal(cache.get(ids[0], other), -fake_delta(0))
    assert np.array_equal(cache.get(ids[0], context()), fake_delta(0))  # the primary context is untouched
    assert np.array_equal(cache.get_base_activation(other), -fake_delta(100))
    assert (tmp_path / f"{ids[0]}.{other.id}.npy").is_file()
    assert (tmp_path / f"base_activation.{other.id}.npy").is_file()
    assert [e.adapter_id for e in cache.entries(other)] == [ids[0]]
    assert cache.get(ids[1], other) is None


def test_per_probe_entries_round_trip(tmp_path, no_warnings):
    cache, ids = DeltaCache(tmp_path), [adapter_id(fake_adapter(i)) for i in range(4)]
    cache.put_base_activation(context(), torch.from_numpy(fake_delta(100, (P, H))))
    cache.put_many(ids[:3], context(), np.stack([fake_delta(i, (P, H)) for i in range(3)]), tasks=["a", "b", "a"])
    cache.put(ids[3], context(), fake_delta(3, (P, H)), path="/p/3")

    reopened = DeltaCache(tmp_path)
    got = reopened.get_many(ids, context())
    assert set(got) == set(ids)
    for i, aid in enumerate(ids):
        assert got[aid].shape == (P, H) and got[aid].dtype == np.float32
        assert np.array_equal(got[aid], fake_delta(i, (P, H)))
    assert np.array_equal(reopened.get(ids[3], context()), fake_delta(3, (P, H)))
    assert np.array_equal(reopened.get_base_activation(context()), fake_delta(100, (P, H)))
    assert np.array_equal(np.load(tmp_path / f"{ids[0]}.npy", allow_pickle=False), fake_delta(0, (P, H)))

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["contexts"][context().id]["shape"] == [P, H]
    assert manifest["adapters"][ids[1]]["shape"] == [P, H]
    assert manifest["base_activations"]["base_activation"]["shape"] == [P, H]
    entries = {e.adapter_id: e for e in reopened.entries(context())}
    assert entries[ids[2]].shape == (P, H) and entries[ids[2]].task == "a"
    assert entries[ids[2]].norm == pytest.approx(float(np.linalg.norm(fake_delta(2, (P, H)))))  # over all elements

    topk = context(settings={**SETTINGS, "target": "topk"})  # another context of the directory, another shape
    cache.put(ids[0], topk, fake_delta(7, (5, 8)))
    cache.put(ids[1], context(probe_hash="ef" * 8), fake_delta(8))
    assert cache.get(ids[0], topk).shape == (5, 8) and cache.get(ids[1], context(probe_hash="ef" * 8)).shape == (H,)
    assert np.array_equal(cache.get(ids[0], context()), fake_delta(0, (P, H)))
    assert reopened.verify() == []


@pytest.mark.parametrize("first, second", [
    ((P, H), (H,)),
    ((H,), (P, H)),
    ((P, H), (P + 1, H)),
    ((P, H), (H, P)),  # same size, other shape
    ((H,), (1, H)),
], ids=["PxH-then-H", "H-then-PxH", "P-then-P+1", "transposed", "H-then-1xH"])
@pytest.mark.parametrize("writer", ["put", "put_many", "base_activation"])
def test_shape_mismatch_within_a_context_is_refused(tmp_path, first, second, writer, no_warnings):
    cache, aid = DeltaCache(tmp_path), adapter_id(fake_adapter(0))
    cache.put(aid, context(), fake_delta(0, first))  # the first array fixes the context's shape
    before = (tmp_path / "manifest.json").read_text()
    other_id, wrong = adapter_id(fake_adapter(1)), fake_delta(1, second)
    shapes = re.escape(str(second)) + ".*" + re.escape(str(first))
    with pytest.raises(CacheError, match=shapes):
        if writer == "put":
            cache.put(other_id, context(), wrong)
        elif writer == "put_many":
            cache.put_many([other_id], context(), wrong[None])
        else:
            cache.put_base_activation(context(), wrong)
    assert (tmp_path / "manifest.json").read_text() == before  # nothing was stored
    assert cache.get(other_id, context()) is None and cache.get_base_activation(context()) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", f"{aid}.npy", "manifest.json"]


def test_base_activation_fixes_the_shape_too(tmp_path, no_warnings):
    cache, aid = DeltaCache(tmp_path), adapter_id(fake_adapter(0))
    cache.put_base_activation(context(), fake_delta(100, (P, H)))
    with pytest.raises(CacheError, match=re.escape(f"{(H,)}") + ".*" + re.escape(f"{(P, H)}")):
        cache.put(aid, context(), fake_delta(0))
    cache.put(aid, context(), fake_delta(0, (P, H)))
    assert np.array_equal(cache.get(aid, context()), fake_delta(0, (P, H)))


@pytest.mark.parametrize("change", [
    {"fingerprint": "ee" * 10},
    {"probe_hash": "ff" * 8},
    {"settings": {**SETTINGS, "layer": -2}},
    {"settings": {**SETTINGS, "dtype": "float32"}},
    {"settings": {**SETTINGS, "chat_template": "raw"}},
    {"settings": {**SETTINGS, "max_length": 256}},
    {"settings": {**SETTINGS, "padding": "right"}},
])
def test_changed_context_is_a_miss(tmp_path, change, no_warnings):
    cache, ids = filled_cache(tmp_path)
    changed = context(**change)
    assert changed.id != context().id
    assert cache.get(ids[0], changed) is None
    assert cache.get_base_activation(changed) is None
    assert cache.missing(ids, changed) == ids
    assert cache.get(ids[0], context()) is not None


def test_base_model_name_is_not_part_of_the_key(tmp_path, no_warnings):
    cache, ids = filled_cache(tmp_path)
    renamed = context(base_model="/models/tiny-copy")  # same weights (fingerprint) under another path
    assert renamed.id == context().id
    assert np.array_equal(cache.get(ids[0], renamed), fake_delta(0))
    canonical = context(settings={"b": [1, 2], "a": (3,)})  # settings are stored in their JSON form
    assert canonical.settings == {"a": [3], "b": [1, 2]}
    assert canonical.id == context(settings={"a": [3], "b": [1, 2]}).id


def test_bad_values_are_rejected(tmp_path):
    cache, ids = filled_cache(tmp_path)
    bad_deltas = [fake_delta(0).astype(np.float64), torch.from_numpy(fake_delta(0)).bfloat16(),
                  np.float32([np.nan] * H), np.float32([np.inf] * H), np.zeros(0, np.float32), np.float32(1.0),
                  np.zeros((H, 0), np.float32)]
    for bad in bad_deltas:
        with pytest.raises(CacheError, match=f"entry of adapter {ids[0]}"):
            cache.put(ids[0], context(), bad)
    with pytest.raises(CacheError, match=r"\(8,\).*\(16,\)"):
        cache.put(ids[0], context(), np.zeros(8, np.float32))  # another shape in the same context
    with pytest.raises(CacheError, match=re.escape("put_many arrays: shape (16,), expected (N, *shape)")):
        cache.put_many(ids[:1], context(), fake_delta(0))
    with pytest.raises(CacheError, match=f"entry of adapter {ids[1]}: contains NaN"):
        cache.put_many(ids[:2], context(), np.stack([fake_delta(0), np.float32([np.inf] * H)]))
    for bad_id in ("../escape", "ABCDEF0123", "12", 7):
        with pytest.raises(CacheError, match="adapter id"):
            cache.put(bad_id, context(), fake_delta(0))
    with pytest.raises(CacheError, match="2 ids, 1 arrays"):
        cache.put_many(ids[:2], context(), fake_delta(0)[None])
    with pytest.raises(CacheError, match="base activation"):
        cache.put_base_activation(context(), np.float32([np.nan] * H))
    with pytest.raises(CacheError, match="settings"):
        context(settings={"dtype": torch.float32})
    with pytest.raises(CacheError, match="fingerprint"):
        context(fingerprint="")
    assert np.array_equal(cache.get(ids[0], context()), fake_delta(0))  # nothing above was stored


# --- corrupt, stale and missing entries ----------------------------------------------------------


def _corrupt(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage":
        path.write_bytes(os.urandom(200))
    elif how == "wrong_shape":
        np.save(path, np.zeros(H + 1, np.float32))
    elif how == "wrong_dtype":
        np.save(path, np.zeros(H, np.float64))
    elif how == "nan":
        np.save(path, np.full(H, np.nan, np.float32))
    elif how == "other_values":
        np.save(path, fake_delta(99))
    elif how == "pickled":
        np.save(path, np.array([{"a": 1}] * H, dtype=object), allow_pickle=True)
    elif how == "missing":
        path.unlink()


CORRUPTIONS = ["truncated", "garbage", "wrong_shape", "wrong_dtype", "nan", "other_values", "pickled", "missing"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_bad_entry_is_reported_dropped_and_recomputed(tmp_path, how):
    cache, ids = filled_cache(tmp_path)
    _corrupt(tmp_path / f"{ids[1]}.npy", how)
    with pytest.warns(UserWarning, match=re.escape(f"{ids[1]}.npy")) as caught:
        assert cache.get(ids[1], context()) is None
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert ids[1] not in json.loads((tmp_path / "manifest.json").read_text())["adapters"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once: now an ordinary miss
        assert cache.missing(ids, context()) == [ids[1]]
        assert np.array_equal(cache.get(ids[0], context()), fake_delta(0))
        cache.put(ids[1], context(), fake_delta(1))  # the caller recomputes it
        assert np.array_equal(cache.get(ids[1], context()), fake_delta(1))


def test_pickled_array_is_never_loaded(tmp_path):
    cache, ids = filled_cache(tmp_path)
    _corrupt(tmp_path / f"{ids[0]}.npy", "pickled")
    with pytest.warns(UserWarning, match="allow_pickle=False"):
        assert cache.get(ids[0], context()) is None


def test_per_probe_entry_of_another_shape_is_dropped(tmp_path):
    cache, aid = DeltaCache(tmp_path), adapter_id(fake_adapter(0))
    cache.put(aid, context(), fake_delta(0, (P, H)))
    np.save(tmp_path / f"{aid}.npy", fake_delta(0, (P, H)).T.copy())  # same values and size, transposed
    with pytest.warns(UserWarning, match=re.escape(f"{aid}.npy: holds float32 {(H, P)}, expected float32 {(P, H)}")):
        assert cache.get(aid, context()) is None
    assert cache.entries(context()) == []


@pytest.mark.parametrize("how", ["truncated", "wrong_shape", "missing"])
def test_bad_base_activation(tmp_path, how):
    cache, _ = filled_cache(tmp_path)
    _corrupt(tmp_path / "base_activation.npy", how)
    with pytest.warns(UserWarning, match="base_activation.npy"):
        assert cache.get_base_activation(context()) is None
    cache.put_base_activation(context(), fake_delta(100))
    assert np.array_equal(cache.get_base_activation(context()), fake_delta(100))


UNKNOWN_FORMAT = json.dumps({"format": "llgbm_ext.delta_cache/9", "primary_context": None, "contexts": {},
                             "base_activations": {}, "adapters": {}})


@pytest.mark.parametrize("text", ["{not json", '{"adapters": {}, "config": {}}', "[1, 2]", "", UNKNOWN_FORMAT])
def test_corrupt_or_foreign_manifest_starts_fresh(tmp_path, text):
    cache, ids = filled_cache(tmp_path)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.warns(UserWarning, match="manifest.json.*fresh manifest"):
        assert cache.get(ids[0], context()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired once, then usable
        assert cache.get(ids[0], context()) is None
        cache.put(ids[0], context(), fake_delta(5))
        assert np.array_equal(cache.get(ids[0], context()), fake_delta(5))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["adapters"]) == [ids[0]]


@pytest.mark.parametrize("key, value", [
    ("fingerprint", "00" * 10),  # no longer matches the context id
    ("shape", None),  # no shape (e.g. a format-1 context record with its hidden_size)
    ("shape", []),
    ("shape", [0]),
    ("shape", [H, -1]),
    ("shape", [16.0]),
    ("shape", H),
])
def test_stale_context_record_is_dropped(tmp_path, key, value):
    cache, ids = filled_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    record = manifest["contexts"][context().id]
    if value is None:
        record["hidden_size"] = record.pop(key)[0]
    else:
        record[key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"context {context().id} does not match"):
        assert cache.get(ids[0], context()) is None
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["contexts"] == {} and manifest["adapters"] == {} and manifest["base_activations"] == {}


def test_record_of_another_context_is_not_a_hit(tmp_path):
    cache, ids = filled_cache(tmp_path)
    other = context(probe_hash="ef" * 8)
    cache.put(ids[1], other, fake_delta(50))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["adapters"][ids[0]]["context"] = other.id  # a record filed under the wrong key
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=f"{ids[0]}.npy: recorded for context {other.id}"):
        assert cache.get(ids[0], context()) is None
    assert cache.get(ids[0], other) is None


def _format_1_cache(root) -> list[str]:
    """A directory as format 1 wrote it: contexts with a hidden_size, one mean delta (H,) per adapter."""
    ids = [adapter_id(fake_adapter(i)) for i in range(2)]
    ctx = {**context().record(), "hidden_size": H}
    record = {"context": "0123456789abcdef", "shape": [H], "norm": 1.0, "sha256": "00" * 8, "path": None, "task": None}
    manifest = {"format": "llgbm_ext.delta_cache/1", "primary_context": "0123456789abcdef",
                "contexts": {"0123456789abcdef": ctx}, "base_activations": {"base_activation": record},
                "adapters": {aid: {**record, "adapter_id": aid} for aid in ids}}
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    for name in ["base_activation", *ids]:
        np.save(root / f"{name}.npy", fake_delta(0))
    return ids


FORMAT_1_CALLS = {
    "get": lambda cache, ids: cache.get(ids[0], context()),
    "get_many": lambda cache, ids: cache.get_many(ids, context()),
    "missing": lambda cache, ids: cache.missing(ids, context()),
    "entries": lambda cache, ids: cache.entries(context()),
    "get_base_activation": lambda cache, ids: cache.get_base_activation(context()),
    "put": lambda cache, ids: cache.put(ids[0], context(), fake_delta(0, (P, H))),
    "put_many": lambda cache, ids: cache.put_many(ids, context(), np.stack([fake_delta(0)] * 2)),
    "put_base_activation": lambda cache, ids: cache.put_base_activation(context(), fake_delta(0, (P, H))),
    "verify": lambda cache, ids: cache.verify(),
}


@pytest.mark.parametrize("call", FORMAT_1_CALLS)
def test_format_1_cache_is_refused_not_overwritten(tmp_path, call, no_warnings):
    root = tmp_path / "old cache"
    ids = _format_1_cache(root)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(CacheError) as caught:
        FORMAT_1_CALLS[call](DeltaCache(root), ids)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{root / 'manifest.json'}: a delta cache of format llgbm_ext.delta_cache/1")
    assert f"delete {root} or use another cache directory" in message
    after = {p.name: p.read_bytes() for p in root.iterdir() if p.name != ".lock"}
    assert after == before  # nothing replaced, dropped or added


def test_verify_reports_and_cleans(tmp_path):
    cache, ids = filled_cache(tmp_path)
    _corrupt(tmp_path / f"{ids[0]}.npy", "truncated")
    _corrupt(tmp_path / f"{ids[2]}.npy", "missing")
    np.save(tmp_path / ("9" * 20 + ".npy"), fake_delta(9))  # written by a writer killed before its manifest update
    (tmp_path / ".manifest.json.x1.tmp").write_text("{")
    (tmp_path / "notes.npy").write_bytes(b"kept: not a cache file name")
    problems = cache.verify()
    assert len(problems) == 4
    for name in (f"{ids[0]}.npy", f"{ids[2]}.npy", "9" * 20 + ".npy", ".manifest.json.x1.tmp"):
        assert sum(name in line for line in problems) == 1, name
    assert (tmp_path / "notes.npy").exists() and not (tmp_path / ("9" * 20 + ".npy")).exists()
    assert cache.verify() == []
    assert cache.missing(ids, context()) == [ids[0], ids[2]]


# --- processes ---------------------------------------------------------------------------------


def _put_entries(root, first: int, count: int) -> None:
    cache = DeltaCache(root)
    for i in range(first, first + count):
        cache.put(adapter_id(fake_adapter(i)), context(), fake_delta(i), path=f"/a/{i}")


def test_concurrent_writers_lose_nothing(tmp_path):
    mp = multiprocessing.get_context("fork")
    writers = [mp.Process(target=_put_entries, args=(tmp_path, 20 * w, 20)) for w in range(3)]
    cache = DeltaCache(tmp_path)
    ids = [adapter_id(fake_adapter(i)) for i in range(60)]
    for p in writers:
        p.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader never sees a half-written file or manifest
        while any(p.is_alive() for p in writers):
            for aid, got in cache.get_many(ids, context()).items():
                assert np.array_equal(got, fake_delta(ids.index(aid)))
        for p in writers:
            p.join()
        assert [p.exitcode for p in writers] == [0, 0, 0]
        assert cache.missing(ids, context()) == []
        assert cache.verify() == []


def _killed_at_rename(root, renames_before_kill: int) -> None:
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) > renames_before_kill:
            os._exit(3)  # killed: no cleanup code runs
        real_replace(src, dst)

    os.replace = replace
    DeltaCache(root).put(adapter_id(fake_adapter(7)), context(), fake_delta(7))


@pytest.mark.parametrize("renames_before_kill", [0, 1])  # before the array's rename / before the manifest's
def test_killed_writer_leaves_no_visible_entry(tmp_path, renames_before_kill):
    cache, ids = filled_cache(tmp_path)
    before = (tmp_path / "manifest.json").read_text()
    proc = multiprocessing.get_context("fork").Process(target=_killed_at_rename, args=(tmp_path, renames_before_kill))
    proc.start()
    proc.join()
    assert proc.exitcode == 3
    assert (tmp_path / "manifest.json").read_text() == before
    assert list(tmp_path.glob(".*.tmp"))  # the interrupted temporary file is still there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(adapter_id(fake_adapter(7)), context()) is None  # a miss, not a corrupt hit
        assert cache.missing(ids, context()) == []
    with pytest.warns(UserWarning, match="temporary file"):  # the next writer removes it
        DeltaCache(tmp_path).put(ids[0], context(), fake_delta(0))
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_changes_nothing(tmp_path, monkeypatch):
    cache, ids = filled_cache(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.put(adapter_id(fake_adapter(7)), context(), fake_delta(7))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # temporary files removed, nothing new
    assert cache.get(adapter_id(fake_adapter(7)), context()) is None
    assert cache.missing(ids, context()) == []
