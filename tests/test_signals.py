"""Behaviour signals: the KL math on toy distributions, KL and Δ signals against their teachers (zero for
the teacher itself, per-probe targets equal to a one-adapter-at-a-time reference), caching, one-line errors."""

import json
import math
import shutil

import pytest
import torch

from conftest import REPO_ROOT
from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.data.teacher_set import TeacherSetError, load_teacher_set
from llgbm_ext.delta.cache import DeltaCache
from llgbm_ext.delta.deltas import DeltaComputer, load_teacher_factors
from llgbm_ext.delta.probes import ProbeSet
from llgbm_ext.losses.kl import TopKKLLoss, teacher_topk
from llgbm_ext.losses.weight import LossError
from llgbm_ext.signals import DeltaSignal, KLSignal, SignalError
from llgbm_ext.signals.kl import KLSignal as KLSignalClass


def test_topk_kl_equals_a_hand_computation():
    teacher = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    student = torch.tensor([0.5, 1.5, -0.5, 0.0, 1.0])
    p, q = teacher.softmax(0), student.softmax(0)
    # k = 2: buckets {0}, {1}, {2, 3, 4}
    p_rest, q_rest = p[2:].sum(), q[2:].sum()
    hand = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + p_rest * math.log(p_rest / q_rest)
    out = TopKKLLoss()(student[None], teacher_topk(teacher[None], 2), torch.tensor([True]))
    assert out["loss"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert out["agreement"].item() == 0.0  # student's argmax (1) is not the teacher's (0)
    # k = V: the full KL divergence
    full = torch.nn.functional.kl_div(student.log_softmax(0), teacher.log_softmax(0), log_target=True, reduction="sum")
    assert TopKKLLoss()(student[None], teacher_topk(teacher[None], 5), torch.tensor([True]))["loss"].item() == \
        pytest.approx(full.item(), rel=1e-5)


def test_topk_kl_is_zero_for_the_teacher_and_masks_positions():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    target = teacher_topk(logits, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = TopKKLLoss()(logits, target, mask)
    assert abs(out["loss"].item()) < 1e-5 and out["agreement"].item() == 1.0
    other = logits.clone()
    other[0, 0] = torch.randn(50) * 5  # a very different distribution at one position ...
    assert TopKKLLoss()(other, target, mask)["loss"].item() > 0.01
    mask[0, 0] = False  # ... which no longer counts once masked
    assert abs(TopKKLLoss()(other, target, mask)["loss"].item()) < 1e-5
    with pytest.raises(LossError, match="empty mask"):
        TopKKLLoss()(logits, target, torch.zeros_like(mask))
    with pytest.raises(LossError, match="top_k"):
        teacher_topk(logits, 51)


@pytest.fixture
def teachers(tmp_path):
    return load_teacher_set(write_fake_teachers(tmp_path / "teachers", per_task=2))


def _common(tiny_model_dir):
    return dict(base_model="tiny-random", model_dir=tiny_model_dir)


def test_kl_signal_is_zero_for_the_teacher_itself_and_cached(tiny_model, tiny_model_dir, teachers, tmp_path,
                                                             monkeypatch):
    model, tokenizer = tiny_model
    tasks = teachers.task_names()
    signal = KLSignal(model, tokenizer, teachers, tasks, examples=6, per_step=3, top_k=16, max_length=32,
                      **_common(tiny_model_dir))
    paths = [e.path for e in teachers.entries]
    entry_tasks = [e.task for e in teachers.entries]
    cache = DeltaCache(tmp_path / "cache")
    targets = signal.prepare(paths, entry_tasks, cache, progress=False)
    assert targets.shape[0] == len(paths) and targets.shape[-1] == 2 * 16 + 1
    own = load_teacher_factors(paths, teachers.layout, torch.float32, "cpu")
    result = signal(own, torch.arange(len(paths)), step=3).loss
    assert abs(result["loss"].item()) < 1e-4 and result["agreement"].item() == 1.0
    shuffled = torch.tensor([2, 3, 4, 5, 0, 1])  # each adapter against another task's teacher
    assert signal(own, shuffled, step=3).loss["loss"].item() > 1e-3  # (a random base model: near-uniform outputs)
    # differentiable in the generated factors
    trainable = {p: (a.clone().requires_grad_(), b.clone().requires_grad_()) for p, (a, b) in own.items()}
    signal(trainable, shuffled, step=0).loss["loss"].backward()
    assert trainable["q_proj"][1].grad.abs().sum() > 0
    # the inputs of a step are a function of (seed, step)
    assert torch.equal(signal.picks(4, 7), signal.picks(4, 7)) and not torch.equal(signal.picks(4, 7), signal.picks(4, 8))
    # a second signal on the same cache reads the teacher logits instead of computing them
    monkeypatch.setattr(KLSignalClass, "compute_targets", lambda *a, **k: pytest.fail("recomputed cached logits"))
    again = KLSignal(model, tokenizer, teachers, tasks, examples=6, per_step=3, top_k=16, max_length=32,
                     **_common(tiny_model_dir))
    assert torch.equal(again.prepare(paths, entry_tasks, cache, progress=False), targets)


def test_task_delta_signal_targets_match_one_adapter_at_a_time(tiny_model, tiny_model_dir, teachers, tmp_path):
    model, tokenizer = tiny_model
    tasks = teachers.task_names()
    signal = DeltaSignal.for_teachers(model, tokenizer, teachers, tasks, probes="task", per_task=4, reduce="none",
                                      **_common(tiny_model_dir))
    paths = [e.path for e in teachers.entries]
    targets = signal.prepare(paths, [e.task for e in teachers.entries], DeltaCache(tmp_path / "c"), progress=False)
    assert targets.shape == (len(paths), 4, teachers.layout.hidden_size)
    for i, entry in enumerate(teachers.entries):  # each adapter alone, on its own task's inputs only
        texts = [r["context"] for r in teachers.train_inputs(entry.task)[:4]]
        alone = DeltaComputer(model, tokenizer, teachers.layout, ProbeSet(f"ref {entry.task}", tuple(texts)))
        torch.testing.assert_close(targets[i], alone.teacher_probe_deltas([entry.path], progress=False)[0],
                                   rtol=0, atol=1e-5)
    own = load_teacher_factors(paths, teachers.layout, torch.float32, "cpu")
    result = signal(own, torch.arange(len(paths))).loss
    assert result["loss"].item() < 1e-6 and result["cos"].item() == pytest.approx(1.0, abs=1e-5)
    mixed = DeltaSignal.for_teachers(model, tokenizer, teachers, tasks, probes="mixed", per_task=2,
                                     **_common(tiny_model_dir))
    assert len(mixed.computer.probes) == 2 * len(tasks) and len(mixed.computer.probe_sets) == 1


def test_signal_errors_are_one_line(tiny_model, tiny_model_dir, teachers):
    model, tokenizer = tiny_model
    with pytest.raises(SignalError, match="fewer than the 99 asked for"):
        DeltaSignal.for_teachers(model, tokenizer, teachers, ["add_1"], probes="task", per_task=99,
                                 **_common(tiny_model_dir))
    del teachers.tasks["add_2"]["train_inputs"]
    with pytest.raises(TeacherSetError, match="'add_2' has no training inputs recorded"):
        DeltaSignal.for_teachers(model, tokenizer, teachers, ["add_2"], probes="task", **_common(tiny_model_dir))
    with pytest.raises(TeacherSetError, match="'add_2' has no training inputs recorded"):
        KLSignal(model, tokenizer, teachers, ["add_2"], **_common(tiny_model_dir))
    signal = KLSignal(model, tokenizer, teachers, ["add_1"], examples=4, per_step=2, **_common(tiny_model_dir))
    own = load_teacher_factors([teachers.entries[0].path], teachers.layout, torch.float32, "cpu")
    with pytest.raises(SignalError, match="no teacher targets; call prepare"):
        signal(own, torch.tensor([0]))
    with pytest.raises(SignalError, match="no inputs for task 'add_3'"):
        signal.sets_of(["add_3"])


def test_train_refuses_kl_without_training_inputs_in_one_line(tmp_path, capsys):
    root = write_fake_teachers(tmp_path / "teachers")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["tasks"]["add_1"]["train_inputs"]  # teachers written before training inputs were recorded
    (root / "manifest.json").write_text(json.dumps(manifest))
    code = main(["train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), f"data.teachers={root}",
                 "loss.signals=[kl]", "generator.kind=simple", "generator.prior=adapter", "steps=1",
                 f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llgbm")]  # besides progress bars
    assert code == 2 and len(lines) == 1 and "'add_1' has no training inputs recorded" in lines[0]
    assert str(root / "manifest.json") in lines[0] and "Traceback" not in err


def test_kl_teacher_logits_of_a_base_changed_in_place_are_recomputed(teachers, tmp_path):
    """The KL signal's cached teacher logits follow the base model's bytes: one float of a deep layer changed
    in place (size, inode and mtime kept) is a miss in a new process, and the served logits are fresh."""
    from model_edits import change_weight_in_place

    from llgbm_ext.delta import cache as cache_module
    from llgbm_ext.delta.teacher import adapter_ids
    from llgbm_ext.models.registry import load_base_model, resolve_base_model

    base = tmp_path / "tiny"
    shutil.copytree(resolve_base_model("tiny"), base)  # never the shipped directory itself
    entries = [e for e in teachers.entries if e.task == "add_1"]
    paths, ids = [e.path for e in entries], adapter_ids([e.path for e in entries], teachers.layout)
    cache = DeltaCache(tmp_path / "cache")

    def run():
        """What a new process does: load the base, build the signal, ask the cache (misses, then targets)."""
        cache_module._FILE_DIGESTS.clear()
        model, tokenizer = load_base_model(base)
        signal = KLSignal(model, tokenizer, teachers, ["add_1"], examples=4, per_step=2, top_k=8, max_length=32,
                          base_model="tiny", model_dir=base)
        missing = cache.missing(ids, signal.context(0))
        return signal, missing, signal.prepare(paths, ["add_1"] * len(paths), cache, progress=False)

    first, missing, before = run()
    assert missing == ids
    _, missing, again = run()
    assert missing == [] and torch.equal(again, before)  # unchanged: a hit
    change_weight_in_place(base / "model.safetensors", "model.layers.3.mlp.down_proj.weight", 104, 1.0)
    signal, missing, served = run()
    assert signal.context(0) != first.context(0) and missing == ids
    fresh = signal.compute_targets(paths, [0] * len(paths))
    assert (fresh - before).abs().max() > 1e-2  # the change matters, so a stale hit would be caught
    torch.testing.assert_close(served, fresh, rtol=0, atol=1e-6)
