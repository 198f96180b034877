"""The pretrained tiny model: its corpus avoids the suite's prompts, training lowers the loss, builds are cached."""

import json

import numpy as np
import pytest
import torch

from llgbm_ext.data.synthetic import SuiteConfig, synthetic_suite
from llgbm_ext.errors import ModelError
from llgbm_ext.models import pretrain
from llgbm_ext.models.pretrain import (
    PretrainConfig, chat_text, packed_rows, plain_text, pretraining_documents, pretrained_model_dir,
)
from llgbm_ext.models.registry import load_base_model, resolve_base_model
from llgbm_ext.models.shipped import SHIPPED_DIR, file_sha256

TINY_BUDGET = PretrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1)


def test_dialogues_match_the_formats_teachers_use(tiny_model):
    from llgbm_ext.data.formatting import PromptFormat, context, target
    from llgbm_ext.data.records import Example

    _, tokenizer = tiny_model
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": "a b"}]
    assert chat_text("s", "Copy: a b", "a b") == tokenizer.apply_chat_template(turns, tokenize=False)
    example = Example("Copy: a b", "a b")
    plain = PromptFormat(chat_template=False)
    assert plain_text("Copy: a b", "a b") == context(example, plain) + target(example, plain) + "<|im_end|>"


def test_corpus_is_deterministic_and_never_shows_a_suite_prompt():
    docs = pretraining_documents(4000, np.random.Generator(np.random.PCG64(0)))
    assert docs == pretraining_documents(4000, np.random.Generator(np.random.PCG64(0)))
    assert docs != pretraining_documents(4000, np.random.Generator(np.random.PCG64(1)))
    # the instruction of every suite task (the text before its first ":" or "?")
    instructions = {e.prompt.split("\n")[0].split(":")[0].split("?")[0]
                    for t in synthetic_suite(SuiteConfig(n_train=8, n_test=1, n_conditions=1)) for e in t.train}
    corpus = "\n".join(docs)
    assert not [i for i in instructions if i in corpus]
    assert "<|im_start|>assistant\n" in corpus and "\nAnswer: " in corpus and " is a colour" in corpus and " moved by " in corpus


def test_packed_rows(tiny_model):
    _, tokenizer = tiny_model
    rows = packed_rows(tokenizer, TINY_BUDGET)
    assert rows.shape == (TINY_BUDGET.steps * TINY_BUDGET.batch_size, TINY_BUDGET.seq_len)
    assert torch.equal(rows, packed_rows(tokenizer, TINY_BUDGET))
    assert (rows == tokenizer.eos_token_id).any()  # documents are separated by end-of-text
    first = tokenizer(pretraining_documents(1, np.random.Generator(np.random.PCG64(TINY_BUDGET.seed)))[0]).input_ids
    n = min(len(first), TINY_BUDGET.seq_len)
    assert rows[0, :n].tolist() == first[:n]  # the corpus, in order, before rows are shuffled for training


def test_build_trains_caches_and_loads(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LLGBM_CACHE", str(tmp_path / "cache"))  # never leave a short-budget model in the shared cache
    monkeypatch.setattr(pretrain, "ensure_tiny_model", lambda: tiny_model_dir)
    calls = []
    real_build = pretrain.build_pretrained_model

    def cheap_build(out_dir, config):  # records the budget asked for, trains with the test's budget
        calls.append(config)
        return real_build(out_dir, TINY_BUDGET)

    monkeypatch.setattr(pretrain, "build_pretrained_model", cheap_build)
    path = pretrain.ensure_pretrained_model(TINY_BUDGET)
    assert path == pretrained_model_dir(TINY_BUDGET) != pretrained_model_dir()  # each budget has its own folder
    assert pretrain.ensure_pretrained_model(TINY_BUDGET) == path and calls == [TINY_BUDGET]
    # the default budget is the shipped model: nothing is pretrained for it
    assert resolve_base_model("tiny") == pretrain.ensure_pretrained_model() == SHIPPED_DIR and calls == [TINY_BUDGET]
    info = json.loads((path / "llgbm_model.json").read_text())
    assert info["pretrain"]["steps"] == TINY_BUDGET.steps and np.isfinite(info["final_loss"])
    assert info["sha256"] == file_sha256(path / "model.safetensors") and info["torch"] == torch.__version__
    random_dir = resolve_base_model("tiny-random")
    assert "pretrain" not in json.loads((random_dir / "llgbm_model.json").read_text()) and len(calls) == 1

    model, tokenizer = load_base_model(path)
    raw, raw_tokenizer = load_base_model(tiny_model_dir)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    geometry = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size")
    assert all(getattr(model.config, k) == getattr(raw.config, k) for k in geometry)
    assert tokenizer.get_vocab() == raw_tokenizer.get_vocab()
    batch = packed_rows(tokenizer, TINY_BUDGET)[:8]
    with torch.no_grad():
        assert model(input_ids=batch, labels=batch).loss < raw(input_ids=batch, labels=batch).loss - 0.5


def test_pretraining_is_reproducible(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    runs = []
    for threads in (1, 2):  # pretraining always runs on one thread, so the caller's setting does not matter
        torch.set_num_threads(threads)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        losses = pretrain.pretrain(model, tokenizer, TINY_BUDGET)
        assert torch.get_num_threads() == threads  # and is restored
        runs.append((losses, model.state_dict()))
    torch.set_num_threads(1)
    assert runs[0][0] == runs[1][0] and losses[-1] < losses[0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("seq_len", 1), ("lr", -1.0), ("warmup_steps", -1)])
def test_bad_config_is_rejected(field, value):
    with pytest.raises(ModelError, match=f"PretrainConfig.{field} must be"):
        PretrainConfig(**{field: value})
