"""Contract tests of the DnD plugin (llgbm_ext.dnd) against a DnD-shaped TEST DOUBLE.

The double is written from dnd-contract §1.4/§1.5/§2.1, not from DnD's code: a dataset with DnD's
FullCond constructor, ``checkpoints`` list, ``(tokens, condition, path)`` items and the two collate
functions; a model with DnD's constructor, ``.model`` decoder, ``criterion_weight`` buffer, in-place
noise and in-place criterion, and ``forward(source, mask, condition, target, noise_enhance)`` /
``generate``. These tests run everywhere (CI has no DnD); test_dnd_integration.py runs the real DnD.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from llgbm_ext.cli import main as llgbm_main
from llgbm_ext.config import ConfigError
from llgbm_ext.delta import DeltaComputer, get_probe_set
from llgbm_ext.dnd import (
    DnDPluginConfig,
    DnDTargets,
    PluginSession,
    builtin_hooks,
    installed_hooks,
)
from llgbm_ext.dnd.hooks import HookError
from llgbm_ext.dnd.loss import BehaviourTerm
from llgbm_ext.dnd.metrics import format_terms
from llgbm_ext.dnd.rows import RowError, RowIdCollate, token_fingerprint
from llgbm_ext.dnd.runner import ROOT_NAME, RunnerError, run_dnd_script
from llgbm_ext.errors import LLGBMError
from llgbm_ext.lora.adapters import save_dnd_checkpoint
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import TINY
from llgbm_ext.lora.tokens import detokenize, lora_to_tokens
from llgbm_ext.losses import DeltaLoss, TokenMSELoss
from llgbm_ext.training.config import KLConfig

NUM_TEXTS, TEXT_LEN, EMBED = 2, 6, 8


# --- the test double -------------------------------------------------------------------------------

class DoubleTokenizer:
    """Stands in for DnD's LoRA tokenizer: ``tokenize(diction) -> (tokens (N, H, W), None)`` in the
    weights' dtype."""

    def tokenize(self, diction, **kwargs):
        return lora_to_tokens(diction, TINY).to(next(iter(diction.values())).dtype), None


def double_text_tokenizer(texts, **kwargs):
    """Stands in for the HF text tokenizer DnD calls with padding="max_length": ids (N, L) and mask."""
    ids = torch.tensor([[(hash(w) % 97) + 1 for w in (t.split() + ["<pad>"] * TEXT_LEN)[:TEXT_LEN]] for t in texts])
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


class DoubleFullCondDataset(torch.utils.data.Dataset):
    """Double of Text2Qwen25LoRA_FullCondDataset (contract §1.4)."""

    dtype = torch.bfloat16

    def __init__(self, checkpoint_folders, tokenizer, num_texts, texts, max_text_length, text_tokenizer,
                 expected_iteration=None, real_length=None, tokenizer_extra_config={}, dataset_extra_config={}):
        self.tokenizer, self.text_tokenizer, self.num_texts = tokenizer, text_tokenizer, num_texts
        self.texts = [[t["prompt"] for t in records] for records in texts]
        self.checkpoints = [os.path.join(f, x) for f in checkpoint_folders for x in sorted(os.listdir(f))[:real_length]]
        self.length_for_each = real_length
        self.real_length = len(self.checkpoints)
        self.length = real_length if expected_iteration is None else expected_iteration + 1000
        self.tokenizer_extra_config = tokenizer_extra_config

    def __len__(self):
        return self.length

    def load_checkpoint(self, path):
        return {k: v.to(self.dtype) for k, v in load_file(path).items()}

    def __getitem__(self, item):
        path = self.checkpoints[item % self.real_length]
        tokens, _ = self.tokenizer.tokenize(self.load_checkpoint(path), **self.tokenizer_extra_config)
        texts = self.texts[(item % self.real_length) // self.length_for_each][: self.num_texts]
        return tokens, self.text_tokenizer(texts), path

    def collate_fn_train(self, batch):
        tokens, conditions, _ = zip(*batch)
        ids = torch.stack([c["input_ids"] for c in conditions])
        return torch.stack(tokens), ids, torch.stack([c["attention_mask"] for c in conditions])

    def collate_fn_test(self, batch):
        assert len(batch) == 1
        tokens, condition, tag = batch[0]
        return tokens[None], condition["input_ids"][None], condition["attention_mask"][None], tag


class DoubleDecoder(nn.Module):
    """Stands in for HyperConvDecoder: condition (B, N, L, C) -> tokens (B, N_tok, H, W) near ``anchor``."""

    def __init__(self, anchor: torch.Tensor):
        super().__init__()
        self.register_buffer("anchor", anchor)
        self.proj = nn.Linear(NUM_TEXTS * TEXT_LEN * EMBED, 16)
        self.up = nn.Linear(16, anchor.numel())
        nn.init.normal_(self.up.weight, std=1e-3)

    def forward(self, condition):
        return self.anchor + self.up(torch.tanh(self.proj(condition.flatten(1)))).view(-1, *self.anchor.shape)


class DoubleHyperConvModel(nn.Module):
    """Double of HyperConvDecoderModel (contract §1.5): in-place noise and in-place criterion."""

    def __init__(self, config, criterion_weight, extra_condition_module=nn.Identity(), *,
                 freeze_extra_condition=False, return_individual_loss=False):
        super().__init__()
        self.return_individual_loss = return_individual_loss
        self.extra_condition = extra_condition_module
        self.model = DoubleDecoder(config["anchor"])
        self.register_buffer("criterion_weight", criterion_weight)

    def forward(self, source=None, mask=None, condition=None, target=None, **kwargs):
        if kwargs.get("generate") is not None:
            return self.generate(source, mask, condition, target, **kwargs)
        condition = self.extract_condition(condition)
        if kwargs.get("noise_enhance") is not None:
            condition += torch.randn_like(condition) * kwargs["noise_enhance"]
            target += torch.randn_like(target) * kwargs["noise_enhance"] * 0.1
        return self.criterion(self.model(condition), target, mask)

    def extract_condition(self, condition):
        return self.extra_condition(condition)

    @torch.inference_mode()
    def generate(self, source=None, mask=None, condition=None, target=None, **kwargs):
        return self.model(self.extract_condition(condition))

    def criterion(self, output, target, mask):
        output[~mask], target[~mask] = 0.0, 0.0
        loss = F.mse_loss(output, target, reduction="none") * self.criterion_weight
        return torch.mean(loss[mask])


class DoubleFullCondModel(DoubleHyperConvModel):
    """Double of HyperConvDecoderModel_FullCond: a frozen condition module, and ``.model`` rebuilt
    after the base constructor (as DnD's FullCond does)."""

    def __init__(self, config, criterion_weight, extractor_type, extra_condition_module=nn.Identity(), *,
                 freeze_extra_condition=True, return_individual_loss=False, layer_index=None):
        super().__init__(config, criterion_weight)
        self.condition_module = extra_condition_module.requires_grad_(False)
        self.model = DoubleDecoder(config["anchor"])

    def extract_condition(self, raw):
        return self.condition_module(raw["input_ids"])  # (B, N, L, C)


# --- fixtures ---------------------------------------------------------------------------------------

def write_checkpoints(folder: Path, seed: int, count: int = 3) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    base = random_factors(TINY, generator=gen)
    paths = []
    for step in range(count):
        factors = {p: (a * (1 + 0.1 * step), b * (1 - 0.1 * step)) for p, (a, b) in base.items()}
        paths.append(save_dnd_checkpoint(state_dict_from_factors(factors, TINY), folder / f"{step + 1}.safetensors", TINY))
    return paths


@pytest.fixture(scope="module")
def dnd_tree(tmp_path_factory):
    """A checkpoint tree like DnD's data/<family>/<Dataset>/<step>.safetensors: two tasks of 3 steps."""
    root = tmp_path_factory.mktemp("double")
    for seed, task in enumerate(("taskA", "taskB")):
        (root / task).mkdir()
        write_checkpoints(root / task, seed)
    return root


def make_dataset(root: Path, real_length: int = 3):
    texts = [[{"prompt": f"question {i} about {t}"} for i in range(4)] for t in ("taskA", "taskB")]
    return DoubleFullCondDataset([str(root / "taskA"), str(root / "taskB")], DoubleTokenizer(), NUM_TEXTS, texts,
                                 TEXT_LEN, double_text_tokenizer, expected_iteration=64, real_length=real_length)


def make_model(anchor: torch.Tensor):
    weight = torch.rand(TINY.num_tokens) + 0.5
    embed = nn.Embedding(100, EMBED)
    return DoubleFullCondModel({"anchor": anchor}, weight.view(1, -1, 1, 1), "BERT", embed)


def session_for(tmp_path, **config) -> PluginSession:
    defaults = dict(base_model="tiny", layout="tiny", probes="generic", dtype="float32", cache_dir=str(tmp_path / "cache"))
    return PluginSession(DnDPluginConfig(**{**defaults, **config}), tmp_path,
                         targets=DnDTargets(dataset=DoubleFullCondDataset, model=DoubleHyperConvModel))


def training_step(model, tokens, ids, mask_ids, noise=1e-4):
    """DnD's loop body (contract §2.1)."""
    mask = ~torch.isnan(tokens)
    tokens = torch.nan_to_num_(tokens, nan=0.0)
    return model(source=None, mask=mask, condition={"input_ids": ids, "attention_mask": mask_ids},
                 target=tokens, noise_enhance=noise)


# --- registry and config ----------------------------------------------------------------------------

def test_registry_order_install_and_exact_undo(tmp_path):
    assert builtin_hooks() == ["row_ids", "delta_term", "log_terms"]
    import builtins

    before = (DoubleFullCondDataset.__dict__["collate_fn_train"], DoubleHyperConvModel.__dict__["__init__"], builtins.print)
    with installed_hooks(session_for(tmp_path)):
        assert DoubleFullCondDataset.__dict__["collate_fn_train"] is not before[0]
        assert DoubleHyperConvModel.__init__ is not before[1] and builtins.print is not before[2]
    assert (DoubleFullCondDataset.__dict__["collate_fn_train"], DoubleHyperConvModel.__dict__["__init__"],
            builtins.print) == before
    with installed_hooks(session_for(tmp_path, hooks=("row_ids",))):
        assert DoubleHyperConvModel.__dict__["__init__"] is before[1]
    with pytest.raises(HookError, match="unknown hook 'nope'"):
        with installed_hooks(session_for(tmp_path, hooks=("nope",))):
            pass
    with pytest.raises(HookError, match="needs 'row_ids'"):
        with installed_hooks(session_for(tmp_path, hooks=("delta_term",))):
            pass


@pytest.mark.parametrize("bad, match", [
    ({"lambda_weight": 0.0, "lambda_delta": 0.0}, "nothing to train"),
    ({"lambda_weight": 0.0, "delta_every": 2}, "delta_every = 1"),
    ({"delta_kind": "l1"}, "delta_kind"),
    ({"delta_rows": -1}, "delta_rows"),
    ({"dtype": "float8"}, "dtype"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        DnDPluginConfig(**bad)


# --- dataset hook -----------------------------------------------------------------------------------

def test_token_fingerprint_exact_and_batch_independent():
    tokens = torch.randn(3, 5, 4, 6).to(torch.bfloat16)  # rows of 120 <= SAMPLE values: every value counts
    fp = token_fingerprint(tokens)
    assert fp.shape == (3, 2) and fp.dtype == torch.int64
    assert torch.equal(token_fingerprint(tokens[1:2]), fp[1:2])  # a row's id does not depend on its batch
    nudged = tokens.clone()
    nudged.view(torch.int16)[2, 4, 3, 5] += 1  # one bf16 ulp in one element
    assert torch.equal(token_fingerprint(nudged)[:2], fp[:2]) and not torch.equal(token_fingerprint(nudged)[2], fp[2])
    with_nan = tokens.clone()
    with_nan[0, 0, 0, 0] = float("nan")
    zeroed = with_nan.nan_to_num(0.0)
    assert torch.equal(token_fingerprint(with_nan), token_fingerprint(zeroed))  # as DnD's loop passes them


def test_token_fingerprint_of_a_long_row_reads_its_shape_and_a_fixed_sample():
    """Rows of the 1.5B size: the fingerprint reads 256 evenly spaced runs of 64 values, the first at the
    row's start; values between the runs do not count, the shape does."""
    tokens = torch.randn(2, 4508, 18, 258).to(torch.bfloat16)
    fp = token_fingerprint(tokens)
    size = tokens[0].numel()
    step = (size - 64) // 255  # hand-computed positions of the runs
    for position, counts in [(0, True), (63, True), (64, False), (step + 10, True), (step - 1, False),
                             (255 * step + 63, True), (size - 1, 255 * step + 63 == size - 1)]:
        nudged = tokens.clone()
        nudged.view(torch.int16).view(2, -1)[1, position] += 1
        again = token_fingerprint(nudged)
        assert torch.equal(again[0], fp[0]) and torch.equal(again[1], fp[1]) != counts, position
    assert torch.equal(token_fingerprint(tokens.transpose(2, 3).contiguous().transpose(2, 3)), fp)  # layout-free
    flat = torch.zeros(1, 4508 * 18 * 258, dtype=torch.bfloat16)  # same values everywhere, other shapes
    assert not torch.equal(token_fingerprint(flat.view(1, 4508, 18, 258)), token_fingerprint(flat.view(1, 4508, 258, 18)))


def test_row_ids_through_dataloader_workers(tmp_path, dnd_tree):
    """DnD's collate output is unchanged, and every row of every batch (two fork workers, shuffled,
    one batch of prefetch) is traced to the checkpoint it was tokenized from."""
    session = session_for(tmp_path, hooks=("row_ids",))
    with installed_hooks(session):
        dataset = make_dataset(dnd_tree)
        collate = dataset.collate_fn_train
        assert isinstance(collate, RowIdCollate)
        batch = [dataset[i] for i in (0, 4)]
        original = DoubleFullCondDataset.collate_fn_train(dataset, batch)
        for ours, theirs in zip(collate(batch), original):
            assert torch.equal(ours, theirs)
        loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2, prefetch_factor=1,
                            collate_fn=collate, drop_last=True)
        seen = 0
        for step, (tokens, ids, mask) in enumerate(loader):
            paths = session.rows.lookup(token_fingerprint(tokens))
            for row, candidates in enumerate(paths):
                assert candidates == [candidates[0]]
                expected, _ = dataset.tokenizer.tokenize(dataset.load_checkpoint(candidates[0]))
                assert torch.equal(tokens[row], expected)
            seen += len(paths)
            if step == 4:
                break
        assert seen == 15
        with pytest.raises(RowError, match="does not match any checkpoint"):
            session.rows.lookup(token_fingerprint(torch.zeros(1, 2, 2)))
    assert session.rows.checkpoints() == dataset.checkpoints


def test_checkpoints_with_one_fingerprint_are_an_error_at_start(tmp_path, dnd_tree):
    """A copy of a checkpoint (equal weights) shares its row and teacher; a checkpoint that differs only
    below bfloat16 resolution (DnD loads in bf16, so its tokens are the same) is refused when DnD builds
    its training DataLoader, in one line naming both files, not at the step whose row matches both."""
    tree = tmp_path / "tree"
    shutil.copytree(dnd_tree, tree)
    shutil.copy(tree / "taskB" / "2.safetensors", tree / "taskB" / "4.safetensors")
    with installed_hooks(session_for(tmp_path, hooks=("row_ids",))) as session:
        dataset = make_dataset(tree, real_length=4)
        tokens = dataset.collate_fn_train([dataset[6]])[0]  # taskB/2.safetensors or its copy
        assert sorted(Path(p).name for p in session.rows.lookup(token_fingerprint(tokens))[0]) == \
            ["2.safetensors", "4.safetensors"]

    weights = load_file(str(tree / "taskA" / "1.safetensors"))
    weights[next(iter(weights))].view(-1)[0] += 1e-9  # float32 only
    save_file(weights, str(tree / "taskA" / "4.safetensors"))
    with installed_hooks(session_for(tmp_path, hooks=("row_ids",))):
        dataset = make_dataset(tree, real_length=4)
        with pytest.raises(RowError) as error:
            dataset.collate_fn_train  # noqa: B018  (DnD's DataLoader(collate_fn=dataset.collate_fn_train))
        message = str(error.value)
        assert "\n" not in message and "different checkpoints whose tokens have one fingerprint" in message
        named = sorted(Path(p).relative_to(tree).as_posix() for p in message.split(": different")[0].split(" and "))
        assert named == ["taskA/1.safetensors", "taskA/4.safetensors"], message
    with installed_hooks(session_for(tmp_path, hooks=("row_ids",), lambda_delta=0.0)) as session:
        make_dataset(tree, real_length=4).collate_fn_train  # noqa: B018  weight only: rows are never looked up
        assert (session.rows.entries[0][1] == -1).all()  # nothing fingerprinted ahead


def test_a_sampled_collision_is_an_error_at_start(tmp_path):
    """Two checkpoints whose tokens differ only between the sampled runs."""
    import types

    from llgbm_ext.dnd.rows import fill_table

    rows = torch.randn(2, 4508, 18, 258).to(torch.bfloat16)
    rows[1] = rows[0]
    rows[1].view(-1)[100] += 1  # between the first and the second run
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.safetensors"))
        save_file({"w": torch.full((2,), float(i))}, paths[-1])
    dataset = types.SimpleNamespace(
        checkpoints=paths, tokenizer_extra_config={}, load_checkpoint=paths.index,
        tokenizer=types.SimpleNamespace(tokenize=lambda i: (rows[i], None)))
    table = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(RowError, match=f"{paths[0]} and {paths[1]}: different checkpoints"):
        fill_table(dataset, table)
    assert torch.equal(table, token_fingerprint(rows))


def test_row_collate_pickles(tmp_path, dnd_tree):
    session = session_for(tmp_path, hooks=("row_ids",))
    with installed_hooks(session):
        dataset = make_dataset(dnd_tree)
        collate = dataset.collate_fn_train
        copy = pickle.loads(pickle.dumps(collate))
    batch = [dataset[1], dataset[5]]
    assert all(torch.equal(a, b) for a, b in zip(copy(batch), collate(batch)))
    assert copy.collate is DoubleFullCondDataset.collate_fn_train  # DnD's function, by qualified name


# --- loss hook --------------------------------------------------------------------------------------

def test_weight_only_hook_equals_dnd_criterion(tmp_path, dnd_tree):
    """λd = 0: the hooked model returns λw·TokenMSELoss, DnD's criterion value (noise included)."""
    dataset = make_dataset(dnd_tree)
    anchor = dataset[0][0].float()
    tokens, ids, mask = dataset.collate_fn_train([dataset[i] for i in (0, 3)])
    plain = make_model(anchor).train()  # built before the hooks: never hooked
    with installed_hooks(session_for(tmp_path, lambda_delta=0.0, lambda_weight=1.0)) as session:
        hooked = make_model(anchor).train()
        hooked.load_state_dict(plain.state_dict())
        torch.manual_seed(5)
        expected = training_step(plain, tokens.clone(), ids, mask)
        torch.manual_seed(5)
        got = training_step(hooked, tokens.clone(), ids, mask)
    assert abs(got.item() - expected.item()) <= 1e-6 * max(1.0, expected.item())
    assert set(session.metrics.latest) == {"loss", "loss/weight"}


def test_delta_term_value_and_gradients(tmp_path, dnd_tree):
    """λw·L_weight + λd·L_delta with Δ_pred from the captured prediction and Δ_teacher of each row's
    own checkpoint; with λw = 0 the gradient reaches the decoder through the delta term alone."""
    dataset0 = make_dataset(dnd_tree)
    anchor = dataset0[0][0].float()
    session = session_for(tmp_path, lambda_weight=0.5, lambda_delta=2.0, delta_rows=2, probes="generic")
    with installed_hooks(session):
        dataset = make_dataset(dnd_tree)
        torch.manual_seed(1)
        model = make_model(anchor).train()
        items = [dataset[i] for i in (4, 1, 3)]
        tokens, ids, mask = dataset.collate_fn_train(items)
        torch.manual_seed(2)
        loss = training_step(model, tokens.clone(), ids, mask, noise=None)
        latest = session.metrics.latest
        assert loss.item() == pytest.approx(0.5 * latest["loss/weight"] + 2.0 * latest["loss/delta"], rel=1e-5)
        loss.backward()  # DnD's criterion wrote into its (cloned) input: no autograd error

        # independent recomputation: DnD criterion semantics and deltas of the first two rows
        term = BehaviourTerm.build(session.config, tmp_path, [p for _, _, p in items], torch.device("cpu"))
        delta = term.signals["delta"]
        with torch.no_grad():
            pred = model.model(model.extract_condition({"input_ids": ids}))
            student = delta.computer.deltas(detokenize(pred[:2], term.layout))
            teacher = delta.computer.teacher_deltas([p for _, _, p in items[:2]], progress=False)
            expected_delta = DeltaLoss("nmse")(student, teacher)
            expected_weight = TokenMSELoss(model.criterion_weight.flatten())(pred, tokens.float())
        assert latest["loss/delta"] == pytest.approx(expected_delta["loss"].item(), rel=1e-4)
        assert latest["loss/weight"] == pytest.approx(expected_weight["loss"].item(), rel=1e-4)

    session = session_for(tmp_path, lambda_weight=0.0, lambda_delta=1.0)
    with installed_hooks(session):
        dataset = make_dataset(dnd_tree)
        model = make_model(anchor).train()
        tokens, ids, mask = dataset.collate_fn_train([dataset[i] for i in (0, 5)])
        training_step(model, tokens, ids, mask).backward()
        grads = [p.grad for p in model.model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
        assert "loss/weight" in session.metrics.latest  # monitored at λw = 0


def _write_train_inputs(folder: Path) -> Path:
    """<Dataset>.json training inputs of the two tasks, in the format ``llgbm teachers`` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt = {"answer_style": "option", "chat_template": False, "use_system": False, "separator": "\nAnswer:"}
    for task in ("taskA", "taskB"):
        inputs = [{"context": f"question {i} about {task}\nAnswer:", "answer": f" {i + 3}"} for i in range(8)]
        (folder / f"{task}.json").write_text(json.dumps({"task": task, "format": fmt, "inputs": inputs}))
    return folder


def test_kl_and_task_delta_signals_through_the_loss_hook(tmp_path, dnd_tree):
    """Both signals through the same hook: λw·L_weight + λd·L_delta(task probes) + λkl·L_kl, gradients reach
    the decoder through the behaviour terms alone (λw = 0); the terms are those the signals compute."""
    inputs = _write_train_inputs(tmp_path / "inputs")
    dataset0 = make_dataset(dnd_tree)
    anchor = dataset0[0][0].float()
    config = dict(lambda_weight=0.0, lambda_delta=0.5, lambda_kl=2.0, signals=("delta", "kl"), probes="task",
                  probes_per_task=3, reduce="none", train_inputs=str(inputs), kl=KLConfig(examples=4, per_step=2))
    session = session_for(tmp_path, **config)
    with installed_hooks(session):
        dataset = make_dataset(dnd_tree)
        model = make_model(anchor).train()
        items = [dataset[i] for i in (0, 4)]
        tokens, ids, mask = dataset.collate_fn_train(items)
        loss = training_step(model, tokens.clone(), ids, mask, noise=None)
        latest = session.metrics.latest
        assert {"loss/delta", "loss/kl", "agreement/kl", "cos/delta"} <= set(latest)
        assert loss.item() == pytest.approx(0.5 * latest["loss/delta"] + 2.0 * latest["loss/kl"], rel=1e-5)
        loss.backward()
        grads = [p.grad for p in model.model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    term = BehaviourTerm.build(session.config, tmp_path, [p for _, _, p in items], torch.device("cpu"))
    assert term.signals["delta"].computer.probe_sets[0].texts == tuple(f"question {i} about taskA\nAnswer:" for i in range(3))


def test_train_inputs_missing_is_one_line(tmp_path, dnd_tree):
    paths = sorted(str(p) for p in dnd_tree.rglob("*.safetensors"))
    config = DnDPluginConfig(base_model="tiny", layout="tiny", dtype="float32", cache_dir=str(tmp_path / "cache"),
                             signals=("kl",), lambda_kl=1.0)
    with pytest.raises(LLGBMError, match="set train_inputs"):
        BehaviourTerm.build(config, tmp_path, paths, torch.device("cpu"))
    inputs = _write_train_inputs(tmp_path / "inputs")
    (inputs / "taskB.json").unlink()
    config = DnDPluginConfig(**{**config.__dict__, "train_inputs": str(inputs)})
    with pytest.raises(LLGBMError, match=r"taskB.json: missing"):
        BehaviourTerm.build(config, tmp_path, paths, torch.device("cpu"))


def test_dnd_teachers_cli_precomputes_every_signal(tmp_path, dnd_tree, capsys, monkeypatch):
    """``llgbm dnd teachers`` fills the cache the loss hook then reads: a later build computes nothing."""
    inputs = _write_train_inputs(tmp_path / "inputs")
    args = ["dnd", "teachers", "--dnd-root", str(tmp_path), "--device", "cpu", str(dnd_tree / "taskA"),
            str(dnd_tree / "taskB")]
    for key, value in dict(base_model="tiny", layout="tiny", probes="task", probes_per_task=2, dtype="float32",
                           cache_dir=str(tmp_path / "cache"), signals="[delta, kl]", lambda_kl=1.0,
                           train_inputs=str(inputs), **{"kl.examples": 4, "kl.per_step": 2}).items():
        args += ["--set", f"{key}={value}"]
    assert llgbm_main(args) == 0
    assert "targets of delta, kl for 6 distinct teacher(s) of 6 file(s)" in capsys.readouterr().out
    from llgbm_ext.signals import KLSignal

    monkeypatch.setattr(DeltaComputer, "teacher_probe_deltas", lambda *a, **k: pytest.fail("recomputed a delta"))
    monkeypatch.setattr(KLSignal, "compute_targets", lambda *a, **k: pytest.fail("recomputed teacher logits"))
    assert llgbm_main(args) == 0


def test_teacher_deltas_come_from_cache_after_first_build(tmp_path, dnd_tree, monkeypatch):
    paths = sorted(str(p) for p in dnd_tree.rglob("*.safetensors"))
    config = DnDPluginConfig(base_model="tiny", layout="tiny", probes="generic", dtype="float32",
                             cache_dir=str(tmp_path / "cache"))
    first = BehaviourTerm.build(config, tmp_path, paths, torch.device("cpu"))
    signal = first.signals["delta"]
    direct = signal.computer.teacher_probe_deltas(paths, progress=False)
    prepared = signal.targets[first.teachers.index([[p] for p in paths], torch.device("cpu"))]
    torch.testing.assert_close(prepared, direct, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(DeltaComputer, "teacher_probe_deltas", lambda *a, **k: pytest.fail("recomputed a cached delta"))
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(Path(paths[0]).read_bytes())  # same content, other path: a cache hit
    second = BehaviourTerm.build(config, tmp_path, paths + [str(copy)], torch.device("cpu"))
    rows = second.teachers.index([[str(copy)], [paths[0]]], torch.device("cpu"))
    assert torch.equal(second.signals["delta"].targets[rows[0]], second.signals["delta"].targets[rows[1]])


def test_generation_and_eval_forwards_untouched(tmp_path, dnd_tree):
    dataset = make_dataset(dnd_tree)
    anchor = dataset[0][0].float()
    with installed_hooks(session_for(tmp_path)) as session:
        model = make_model(anchor)
        tokens, ids, mask, _tag = dataset.collate_fn_test([dataset[2]])
        condition = {"input_ids": ids, "attention_mask": mask}
        with torch.no_grad():
            generated = model.generate(source=None, mask=None, condition=condition, target=None)
            model.eval()
            loss = training_step(model, tokens.clone(), ids, mask, noise=None)
        assert torch.equal(generated, model.model(model.extract_condition(condition)))
        assert loss.item() == pytest.approx(model.criterion(generated.clone(), tokens.float(), ~torch.isnan(tokens)).item())
        assert session.metrics.latest == {}  # nothing was treated as a training step


# --- trainer hook -----------------------------------------------------------------------------------

def test_terms_join_dnd_print_line_and_wandb_log(tmp_path, capsys, monkeypatch):
    logged = []
    fake_wandb = types.SimpleNamespace(log=lambda data, *a, **k: logged.append(data))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    original_log = fake_wandb.log
    session = session_for(tmp_path, hooks=("log_terms",))
    with installed_hooks(session):
        for value in (1.0, 3.0):
            session.metrics.record({"loss": torch.tensor(value), "loss/weight": torch.tensor(value / 2)})
        print("step:1 Loss: 2.000000")
        print("step:1 Loss: unrelated text")
        fake_wandb.log({"train_loss": 2.0, "learning_rate:": 1e-4})
        fake_wandb.log({"generated_l2norm": 0.1})
    assert fake_wandb.log is original_log
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step:1 Loss: 2.000000 | " + format_terms({"loss": 2.0, "loss/weight": 1.0})
    assert out[1] == "step:1 Loss: unrelated text"
    assert logged[0] == {"train_loss": 2.0, "learning_rate:": 1e-4, "llgbm/loss": 3.0, "llgbm/loss_weight": 1.5}
    assert logged[1] == {"generated_l2norm": 0.1}


# --- runner, CLI, scripts, patches -------------------------------------------------------------------

RECORDER = '''import json, os, sys
parts = os.path.abspath(__file__).split(os.sep)
root = os.sep.join(parts[: parts.index("Drag-and-Drop-LLMs") + 1])
sys.path.append(root)
os.chdir(root)
record = {"name": __name__, "file": __file__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
          "num_processes": os.environ["NUM_PROCESSES"]}
with open("record.json", "w") as f:
    json.dump(record, f)
'''


@pytest.mark.parametrize("folder", ["dnd_checkout", ROOT_NAME])
def test_runner_runs_script_as_main_from_its_root(tmp_path, monkeypatch, folder):
    import json

    root = tmp_path / folder
    (root / "workspace" / "dnd").mkdir(parents=True)
    script = root / "workspace" / "main" / "tasks" / "family" / "train_x_Y.py"
    script.parent.mkdir(parents=True)
    script.write_text(RECORDER)
    monkeypatch.chdir(root / "workspace" / "main")
    monkeypatch.delenv("NUM_PROCESSES", raising=False)
    argv, path = list(sys.argv), list(sys.path)
    run_dnd_script("tasks/family/train_x_Y.py", ["--flag", "1"], hooks=False)
    record = json.loads((root / "record.json").read_text())
    ran, rel = Path(record["file"]), script.relative_to(root).parts
    assert record["name"] == "__main__" and ran.is_absolute()
    assert ran.parts[-len(rel):] == rel and ran.parts[-len(rel) - 1] == ROOT_NAME  # DnD's root discovery works
    assert Path(record["cwd"]) == root.resolve()
    assert record["argv"] == [record["file"], "--flag", "1"] and record["path0"] == str(ran.parent)
    assert record["num_processes"] == "1"
    assert sys.argv == argv and sys.path == path and "NUM_PROCESSES" not in os.environ
    assert ran.exists() == (folder == ROOT_NAME) and script.exists()  # a temporary link is gone, the checkout is not
    mismatch = DnDPluginConfig(base_model="tiny", layout="qwen2.5-0.5b")
    with pytest.raises(RunnerError, match="does not fit base model"):  # before the script runs
        run_dnd_script(script, [], mismatch)


def test_overlay_cli_copies_once_and_refuses_clashes(tmp_path, capsys):
    root = tmp_path / "dnd"
    (root / "workspace" / "dnd").mkdir(parents=True)
    assert llgbm_main(["dnd", "overlay", "--dnd-root", str(root)]) == 0
    smoke = root / "workspace" / "main" / "tasks" / "llgbm_smoke" / "train_tinylora_Smoke.py"
    assert smoke.read_bytes() == (REPO_ROOT / "workspace_overrides" / "main" / "tasks" / "llgbm_smoke" /
                                  "train_tinylora_Smoke.py").read_bytes()
    assert (root / "workspace" / "llgbm" / "configs" / "smoke.yaml").is_file()
    assert not (root / "workspace" / "README.md").exists()
    capsys.readouterr()
    assert llgbm_main(["dnd", "overlay", "--dnd-root", str(root)]) == 0
    assert "0 file(s) written" in capsys.readouterr().out
    smoke.write_text("# changed\n")
    assert llgbm_main(["dnd", "overlay", "--dnd-root", str(root)]) == 2
    assert "exists and differs" in capsys.readouterr().err
    assert llgbm_main(["dnd", "overlay", "--dnd-root", str(tmp_path)]) == 2


def test_overlay_configs_load_and_name_existing_probe_files():
    from llgbm_ext.dnd.config import load_plugin_config

    overrides = REPO_ROOT / "workspace_overrides"
    configs = sorted((overrides / "llgbm" / "configs").glob("*.yaml"))
    assert [c.stem for c in configs] == ["coding1.5B", "common_sense_reasoning", "math1.5B", "smoke"]
    for path in configs:
        probes = load_plugin_config(path).probes
        assert probes.startswith("./workspace/llgbm/probes/"), path  # relative to the DnD root after the overlay
        assert get_probe_set(str(overrides / probes.removeprefix("./workspace/"))).texts


def test_scripts_parse_and_call_the_wrapper():
    scripts = REPO_ROOT / "scripts"
    tasks = ["ARC-c", "ARC-e", "BoolQ", "HellaSwag", "OBQA", "PIQA", "WinoGrande"]
    files = [scripts / "common_sense_reasoning" / t / "training_and_generation.sh" for t in tasks]
    files += [scripts / "math1.5B" / "training_and_generation.sh", scripts / "coding1.5B" / "training_and_generation.sh"]
    for file in files + [scripts / "launch_llgbm.sh", scripts / "dnd_steps.sh"]:
        subprocess.run(["bash", "-n", str(file)], check=True)
    for file in files:
        text = file.read_text()
        assert "dnd_steps.sh" in text and "llgbm_train tasks/" in text and "--llgbm-config" in text
        assert "dnd_generate generate/" in text and "python generate/" not in text
    for file in files[:-1]:
        assert "llgbm eval --base-model" in file.read_text()


def test_patches_are_listed_and_touch_only_dnd_files():
    patches = sorted((REPO_ROOT / "patches").glob("*.patch"))
    readme = (REPO_ROOT / "patches" / "README.md").read_text()
    assert [p.name for p in patches] == ["fix-eval-output.patch", "fix-num-processes.patch", "fix-repo-root.patch",
                                         "fix-scheduler-all-ranks.patch", "llgbm-flag.patch"]
    for patch in patches:
        assert f"`{patch.name}`" in readme
        targets = [line.split()[1] for line in patch.read_text().splitlines() if line.startswith("+++ ")]
        assert targets and all(t.startswith("b/workspace/main/") for t in targets)
    flag = (REPO_ROOT / "patches" / "llgbm-flag.patch").read_text()
    assert "-m llgbm_ext.dnd.runner" in flag and not any(
        line.startswith("-") and not line.startswith("---") for line in flag.splitlines())


def test_launch_wrapper_runs_dnd_launch_through_the_runner(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text('#!/bin/sh\necho "NUM_PROCESSES=$NUM_PROCESSES $*"\n')
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("LLGBM_LAUNCH_FLAGS", None)
    wrapper = str(REPO_ROOT / "scripts" / "launch_llgbm.sh")

    def launch(*args, **extra):
        return subprocess.run(["bash", wrapper, *args], env={**env, **extra}, check=True, capture_output=True,
                              text=True).stdout.split()

    words = launch("tasks/x/train_a_B.py", "4", "--llgbm", "--llgbm-config", "c.yaml")
    port = next(w for w in words if w.startswith("--main_process_port="))
    assert 20000 <= int(port.split("=")[1]) < 40000
    assert words == ["NUM_PROCESSES=4", "launch", "--multi_gpu", "--mixed_precision=bf16", "--num_processes=4", port,
                     "--num_machines=1", "--dynamo_backend=no", "-m", "llgbm_ext.dnd.runner", "--llgbm-config",
                     "c.yaml", "tasks/x/train_a_B.py"]
    cpu = launch("tasks/x/train_a_B.py", "1", LLGBM_LAUNCH_FLAGS="--cpu --mixed_precision=no")
    assert cpu[2:5] == ["--cpu", "--mixed_precision=no", "--num_processes=1"] and cpu[-3:] == ["-m", "llgbm_ext.dnd.runner", "tasks/x/train_a_B.py"]
    assert subprocess.run(["bash", wrapper, "only-one-arg"], env=env, capture_output=True).returncode == 2
