"""The plugin's hooks on DnD's own classes, in-process (skipped when dnd_repo/ is empty).

DnD's ``Text2Qwen25LoRA_FullCondDataset`` (its collate hooked by ``row_ids``), its
``HyperConvDecoderModel_FullCond`` and the ``HyperConvDecoderModel_SuperLarge`` of the 1.5B/7B math
and coding scripts, imported from dnd_repo/workspace, train on the smoke task's LoRAs of the tiny
base model with DnD's loop body. Each hooked model is checked against an unhooked twin built before
the hooks (same weights, same noise): on a step without a behaviour term the two agree to rounding.
"""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT, requires_dnd
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer

from llgbm_ext.dnd import DnDPluginConfig, PluginSession, installed_hooks
from llgbm_ext.dnd.loss import BehaviourTerm
from llgbm_ext.dnd.smoke import SMOKE_TASKS, ensure_smoke_data
from llgbm_ext.generator.text_encoder import resolve_sentence_model
from llgbm_ext.lora.layout import TINY
from llgbm_ext.lora.tokens import lora_to_tokens

pytestmark = requires_dnd

TASKS = SMOKE_TASKS[:2]
NUM_TEXTS, TEXT_LEN = 4, 16  # the smoke task's
STEPS_PER_TASK = 6
# Under bf16 autocast the generator's output carries bf16's rounding (8 significant bits: up to
# 2**-8 = 3.9e-3 per element); the delta term, an average over many elements, moved by 1.1e-4 to 1.2e-3
# (relative) on 16 batches of this setup measured against fp32. The tolerance is 4x the largest and
# below bf16's epsilon 2**-7 = 7.8e-3.
BF16_RTOL = 5e-3


class TinyLoraTokenizer:
    """DnD's LoRA tokenizer interface for the ``tiny`` layout (the tokens equal DnD's scheme: test_tokens).
    DnD's dataset hands it the checkpoint with the ``base_model.model.`` prefix stripped."""

    def tokenize(self, diction, **kwargs):
        return lora_to_tokens({f"base_model.model.{k}": v for k, v in diction.items()}, TINY), None


@pytest.fixture(scope="module")
def dnd(tmp_path_factory):
    """DnD's classes (dnd_repo on sys.path, as DnD's scripts put their root), the smoke data and the
    offline MiniLM text encoder the smoke task uses in place of DnD's MiniLM-L12."""
    sys.path.insert(0, str(REPO_ROOT / "dnd_repo"))
    from workspace.dnd.dataset import Text2Qwen25LoRA_FullCondDataset
    from workspace.dnd.model import (
        HyperConvDecoderModel_FullCond,
        HyperConvDecoderModel_SuperLarge,
        decoderonly,
    )
    from workspace.dnd.tools import calculate_mean_criterion_weight

    root = tmp_path_factory.mktemp("dnd_real")
    data = ensure_smoke_data(root)
    encoder = resolve_sentence_model("all-MiniLM-L6-v2")
    criterion_weight = calculate_mean_criterion_weight(
        [str(data / "criterion_weights" / t / "criterion_weight.pt") for t in TASKS])
    yield SimpleNamespace(
        Dataset=Text2Qwen25LoRA_FullCondDataset, FullCond=HyperConvDecoderModel_FullCond,
        SuperLarge=HyperConvDecoderModel_SuperLarge, decoderonly=decoderonly, root=root, data=data,
        text_tokenizer=AutoTokenizer.from_pretrained(encoder), encoder=AutoModel.from_pretrained(encoder),
        criterion_weight=criterion_weight.view(1, -1, 1, 1))
    sys.path.remove(str(REPO_ROOT / "dnd_repo"))


def session_for(dnd, **overrides) -> PluginSession:
    """A session on DnD's own classes (targets resolved from workspace.dnd) with the tiny base model."""
    settings = {"base_model": "tiny", "layout": "tiny", "probes": "generic", "dtype": "float32",
                "cache_dir": str(dnd.root / "cache")}
    return PluginSession(DnDPluginConfig(**{**settings, **overrides}), dnd.root)


def make_dataset(dnd, text_length: int = TEXT_LEN):
    """DnD's FullCond dataset as the smoke task builds it (checkpoints read in DnD's bf16)."""
    texts = [json.loads((dnd.data / "prompts" / f"{t}_train.json").read_text()) for t in TASKS]
    return dnd.Dataset([str(dnd.data / "checkpoints" / t) for t in TASKS], TinyLoraTokenizer(), num_texts=NUM_TEXTS,
                       texts=texts, max_text_length=text_length, text_tokenizer=dnd.text_tokenizer,
                       expected_iteration=32, real_length=STEPS_PER_TASK)


def batches(dataset, count: int, batch_size: int = 3) -> list[tuple]:
    """``count`` training batches through the dataset's (hooked) ``collate_fn_train``, shuffled as DnD's loader."""
    random.seed(0)  # DnD's dataset samples the prompts with Python's random
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=dataset.collate_fn_train,
                        drop_last=True)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out
    raise AssertionError("the loader ran out of batches")


def fullcond(dnd):
    """The smoke task's HyperConvDecoderModel_FullCond: (4, 16, 384) -> (16, 12, 64) -> tiny's (152, 10, 66)."""
    config = {"features": [(NUM_TEXTS, TEXT_LEN, 384), (16, 12, 64), (TINY.num_tokens, *TINY.token_size)],
              "condition_dim": (NUM_TEXTS, TEXT_LEN, 384), "kernel_size": 3}
    return dnd.FullCond(config=config, criterion_weight=dnd.criterion_weight, extractor_type="BERT",
                        extra_condition_module=dnd.encoder)


def dnd_step(model, batch, seed: int, noise: float | None = 1e-4) -> torch.Tensor:
    """DnD's training-loop body (contract §2.1) on a copy of the batch, with seeded noise."""
    tokens, input_ids, attention_mask = batch
    tokens = tokens.clone()
    mask = ~torch.isnan(tokens)
    tokens = torch.nan_to_num_(tokens, nan=0.0)
    torch.manual_seed(seed)
    return model(source=None, mask=mask, condition={"input_ids": input_ids, "attention_mask": attention_mask},
                 target=tokens, noise_enhance=noise)


def grads_of(model) -> torch.Tensor:
    """The trainable parameters' gradients, flattened (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters() if p.requires_grad])


def step_both(plain, hooked, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward of the unhooked twin (synced to the hooked model's weights) and the hooked model."""
    plain.load_state_dict(hooked.state_dict())
    results = []
    for model in (plain, hooked):
        model.zero_grad()
        loss = dnd_step(model, batch, seed)
        loss.backward()
        results += [loss.detach(), grads_of(model)]
    return tuple(results)


def checkpoint_tokens(dataset) -> dict[str, torch.Tensor]:
    """Each training checkpoint's tokens, as DnD's ``__getitem__`` makes them (NaN read as 0, as DnD's loop does)."""
    return {path: dataset.tokenizer.tokenize(dataset.load_checkpoint(path))[0].nan_to_num(0.0)
            for path in dataset.checkpoints}


def teacher_paths(known: dict[str, torch.Tensor], tokens: torch.Tensor) -> list[list[str]]:
    """The checkpoint each batch row was tokenized from, found by comparing tokens (not by the plugin)."""
    rows = [[path for path, t in known.items() if torch.equal(t, row)] for row in tokens.nan_to_num(0.0)]
    assert all(len(r) == 1 for r in rows)
    return rows


# --- delta_every ------------------------------------------------------------------------------------

def test_delta_term_on_every_nth_step_weight_term_on_every_step(dnd):
    """delta_every = 3 over 7 optimizer steps: the gradient is DnD's own on every step plus, on steps
    0, 3 and 6 only, λd times the delta term's gradient (evaluated apart on the step's prediction); the
    logged L_weight is DnD's criterion on every step; the other steps are exactly DnD's."""
    plain = fullcond(dnd).train()  # built before the hooks: never hooked
    session = session_for(dnd, lambda_weight=1.0, lambda_delta=0.5, delta_every=3)
    with installed_hooks(session):
        dataset = make_dataset(dnd)
        hooked = fullcond(dnd).train()
        trainable = [p for p in hooked.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        term = BehaviourTerm.build(session.config, dnd.root, dataset.checkpoints, torch.device("cpu"))
        known = checkpoint_tokens(dataset)
        predictions = []
        hooked.model.register_forward_hook(lambda module, args, output: predictions.append(output))
        logged_delta = []
        for step, batch in enumerate(batches(dataset, 7)):
            plain.load_state_dict(hooked.state_dict())
            plain.zero_grad()
            plain_loss = dnd_step(plain, batch, seed=step)
            plain_loss.backward()
            hooked.zero_grad()
            loss = dnd_step(hooked, batch, seed=step)
            delta = 0.5 * term(predictions[-1], teacher_paths(known, batch[0]), step)["delta"]["loss"]
            delta_grads = torch.autograd.grad(delta, trainable, retain_graph=True, allow_unused=True)
            delta_grads = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                     for g, p in zip(delta_grads, trainable)])
            loss.backward()
            latest = session.metrics.latest
            assert latest["loss/weight"] == pytest.approx(plain_loss.item(), rel=1e-6, abs=2e-6)
            if "loss/delta" in latest:
                logged_delta.append(step)
                assert 0.5 * latest["loss/delta"] == pytest.approx(delta.item(), rel=1e-5)
                assert loss.item() == pytest.approx(plain_loss.item() + delta.item(), rel=1e-5)
                expected = grads_of(plain) + delta_grads
                assert (delta_grads.norm() > 1e-3 * expected.norm()).item()
            else:
                assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6, abs=2e-6)
                expected = grads_of(plain)
            # summation order differs (measured 1e-6 on the delta steps, 0 on the others)
            assert ((grads_of(hooked) - expected).norm() <= 1e-5 * expected.norm()).item()
            optimizer.step()
    assert logged_delta == [0, 3, 6]


# --- the 1.5B scripts' _SuperLarge --------------------------------------------------------------------

SUPER_TEXT_LEN, SUPER_CHUNK, MODIFIED = 32, 16, 12  # 1.5B math: 4608 = 9 x 512, modified_length 1000


def super_large(dnd):
    """``HyperConvDecoderModel_SuperLarge`` built as train_qwen1.5lora_Math.py builds it, shrunken: texts
    of 2 encoder chunks (there 9 of 512) projected to ``modified_length`` 12 (there 1000), and a HyperConv
    from (num_texts, modified_length, 384) to the tiny layout's tokens (there (4508, 18, 258))."""
    config = {"features": [(NUM_TEXTS, MODIFIED, 384), (16, 12, 64), (TINY.num_tokens, *TINY.token_size)],
              "condition_dim": (NUM_TEXTS, MODIFIED, 384), "kernel_size": 3}
    return dnd.SuperLarge(config=config, criterion_weight=dnd.criterion_weight, max_length=SUPER_TEXT_LEN,
                          modified_length=MODIFIED, extractor_type="BERT", extra_condition_module=dnd.encoder)


def test_super_large_of_the_1_5b_scripts_through_the_hooks(dnd, monkeypatch):
    """The _SuperLarge forward (chunked BERT condition, down/gate projections, in-place noise and
    criterion) through the hooks: the loss is λw·L_weight + λd·L_delta with L_weight DnD's criterion;
    with λw = 0 the delta term alone trains the projections and the decoder; generation is untouched."""
    monkeypatch.setattr(dnd.decoderonly, "BERT_MAX_L", SUPER_CHUNK)  # texts longer than a chunk, as at 1.5B
    plain = super_large(dnd).train()
    session = session_for(dnd, lambda_weight=1.0, lambda_delta=0.5)
    with installed_hooks(session):
        dataset = make_dataset(dnd, text_length=SUPER_TEXT_LEN)
        hooked = super_large(dnd).train()
        train = batches(dataset, 2)
        for step, batch in enumerate(train):
            plain_loss, _, loss, grads = step_both(plain, hooked, batch, seed=step)
            latest = session.metrics.latest
            assert latest["loss/delta"] > 0 and torch.isfinite(grads).all()
            assert latest["loss/weight"] == pytest.approx(plain_loss.item(), rel=1e-6, abs=2e-6)
            assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * latest["loss/delta"], rel=1e-5)
        hooked.eval()
        tokens, input_ids, attention_mask = train[0]
        condition = {"input_ids": input_ids, "attention_mask": attention_mask}
        generated = hooked.generate(source=None, mask=None, condition=condition, target=None)
        assert generated.shape == (len(tokens), TINY.num_tokens, *TINY.token_size)
        torch.testing.assert_close(generated, plain.eval().generate(source=None, mask=None, condition=condition,
                                                                    target=None))

    session = session_for(dnd, lambda_weight=0.0, lambda_delta=1.0)
    with installed_hooks(session):
        dataset = make_dataset(dnd, text_length=SUPER_TEXT_LEN)
        hooked = super_large(dnd).train()
        loss = dnd_step(hooked, batches(dataset, 1)[0], seed=0)
        assert loss.item() == pytest.approx(session.metrics.latest["loss/delta"], rel=1e-6)
        loss.backward()
        trained = {name: p.grad for name, p in hooked.named_parameters() if p.requires_grad}
        assert {"down_proj.weight", "gate_proj.weight"} <= set(trained)
        assert all(g is not None and g.abs().sum() > 0 for g in trained.values()), \
            [n for n, g in trained.items() if g is None or not g.abs().sum() > 0]


# --- bf16 -------------------------------------------------------------------------------------------

def test_delta_term_under_bf16_autocast_matches_fp32(dnd):
    """DnD trains under bf16 autocast on GPUs (``accelerator.autocast()``). On CPU, the hooked step under
    ``torch.autocast(bfloat16)`` gives the fp32 step's delta term within ``BF16_RTOL`` and a finite
    gradient, and its delta term is exactly that of its own bf16 prediction evaluated in fp32: the hook
    runs the behaviour term with autocast off, the student as the teachers."""
    session = session_for(dnd, lambda_weight=1.0, lambda_delta=0.5)
    with installed_hooks(session):
        dataset = make_dataset(dnd)
        model = fullcond(dnd).train()
        predictions = []
        model.model.register_forward_hook(lambda module, args, output: predictions.append(output.detach()))
        random.seed(0)
        steps = [[dataset[i] for i in rows] for rows in ((0, 7, 3), (10, 2, 5))]
        collate = dataset.collate_fn_train  # registers the dataset's checkpoints with the session
        term = BehaviourTerm.build(session.config, dnd.root, session.rows.checkpoints(), torch.device("cpu"))
        for step, items in enumerate(steps):
            batch = collate(items)
            fp32 = dnd_step(model, batch, seed=step)
            fp32_delta = session.metrics.latest["loss/delta"]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = dnd_step(model, batch, seed=step)
            bf16_delta = session.metrics.latest["loss/delta"]
            assert predictions[-2].dtype == torch.float32 and predictions[-1].dtype == torch.bfloat16
            assert bf16_delta == pytest.approx(fp32_delta, rel=BF16_RTOL)
            assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(fp32.item(), rel=BF16_RTOL)
            model.zero_grad()
            bf16.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.model.parameters())
            with torch.no_grad():
                own = term(predictions[-1].float(), [[path] for _, _, path in items], step)["delta"]["loss"]
            assert bf16_delta == pytest.approx(own.item(), rel=1e-6)
