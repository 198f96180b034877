"""The choice and lm+choice objectives of teachers: rows per option, a loss equal to cross-entropy over the options'
scores as evaluation computes them (plus the gold option's lm term), a run that records it, a multitask LoRA that
inherits it, and clear errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llgbm_ext.cli import build_parser
from llgbm_ext.cli.teachers import config_from_args
from llgbm_ext.data.formatting import PromptFormat, candidates, context
from llgbm_ext.data.records import Example, Task
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.eval.scoring import AdapterBatch, sequence_log_likelihoods
from llgbm_ext.teachers.batches import encode_choices, encode_task, make_batch
from llgbm_ext.teachers.config import TeacherConfig, TeacherError
from llgbm_ext.teachers import multitask
from llgbm_ext.teachers.multitask import MixtureTrainer, multitask_config
from llgbm_ext.teachers.pipeline import teacher_layout, train_teachers
from llgbm_ext.teachers.train import GroupTrainer, task_losses

FMT = PromptFormat(answer_style="cloze")


def _task(name: str, words: list[str], options: int | None = None) -> Task:
    """Examples with ``options`` options each, else two, three and four in turn (gold at different places)."""
    train = []
    for i, word in enumerate(words):
        choices = tuple(f"{word} {j}" for j in range(options or 2 + i % 3))
        train.append(Example(f"Question {i} about {word}?", "", choices=choices, answer=i % len(choices)))
    return Task(name, "mc", train=train)


def _config(model_dir, tasks, **overrides):
    base = dict(warmup_steps=4, snapshot_every=2, snapshots=2, batch_size=3, lr=2e-2, lr_warmup=1, max_length=48,
                save_every=4, eval_limit=8, probes=None, objective="choice")
    return TeacherConfig(base_model=str(model_dir), tasks=tasks, **{**base, **overrides})


def test_rows_are_each_option_after_its_context(tiny_model):
    _, tokenizer = tiny_model
    task = _task("t", ["red", "dog", "sun", "cup"])
    encoded = encode_choices(task, tokenizer, FMT, 48, tokenizer.pad_token_id)
    assert len(encoded) == 4 and encoded.option_rows.tolist() == [0, 2, 5, 9, 11]
    batch = make_batch([encoded, encoded], [np.array([2, 0]), np.array([1])])
    assert batch.row_example.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, -1, -1, -1]  # task 1 filled up to 6 rows
    assert batch.example_task.tolist() == [0, 0, 1] and batch.row_task.tolist() == [0] * 6 + [1] * 6
    assert not batch.predicts[-3:].any() and batch.predicts[:-3].any(1).all()  # fill rows predict nothing
    for e, (task_index, example) in enumerate([(0, 2), (0, 0), (1, 1)]):
        rows = (batch.row_example == e).nonzero().flatten().tolist()
        source = task.train[example]
        for option, row in zip(candidates(source, FMT), rows):
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            scored = tokenizer(option, add_special_tokens=False)["input_ids"]
            assert ids[-len(scored):] == scored  # context + candidate, no end token
            prompt = tokenizer(context(source, FMT), add_special_tokens=True)["input_ids"]
            assert ids[: len(prompt)] == prompt
        assert rows[source.answer] == batch.gold[e].item()


def test_loss_is_cross_entropy_over_the_scores_evaluation_uses(tiny_model_dir):
    from llgbm_ext.models.registry import load_base_model

    model, tokenizer = load_base_model(tiny_model_dir)
    config = _config(tiny_model_dir, ("a", "b"))
    layout = teacher_layout(tiny_model_dir, config)
    tasks = [encode_choices(_task(n, words, options), tokenizer, FMT, 48, tokenizer.pad_token_id)
             for n, words, options in (("a", ["red", "dog", "sun"], None), ("b", ["tree", "car", "blue", "fish"], 2))]
    trainer = GroupTrainer(model, layout, tasks, config, "/nonexistent")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that change the scores, a different one per task
        for _, b in trainer.factors.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    batch = trainer.batch(0)
    assert (batch.row_example < 0).sum() == 3  # 9 option rows of a, 6 of b: b is filled up
    ours = task_losses(model, trainer.lora, trainer.factors, batch, "choice")
    both = task_losses(model, trainer.lora, trainer.factors, batch, "lm+choice")

    for k in range(2):
        adapter = AdapterBatch(trainer.lora, {p: (a[k : k + 1].detach(), b[k : k + 1].detach())
                                              for p, (a, b) in trainer.factors.items()})
        rows = ((batch.row_task == k) & (batch.row_example >= 0)).nonzero().flatten()
        sequences = [batch.input_ids[r][batch.attention_mask[r].bool()].tolist() for r in rows]
        scored = [int(batch.predicts[r].sum()) for r in rows]
        sums, _ = sequence_log_likelihoods(model, sequences, scored, tokenizer.pad_token_id, adapter)
        scores = sums[0] / torch.tensor(scored)  # evaluation's mean per-token log-likelihood
        losses, gold_nll = [], []
        for e in (batch.example_task == k).nonzero().flatten():
            mine = (batch.row_example[rows] == e).nonzero().flatten()
            gold = int((rows[mine] == batch.gold[e]).nonzero())
            losses.append(F.cross_entropy(scores[mine][None], torch.tensor([gold])))
            gold_nll.append(-scores[mine][gold])
        assert torch.allclose(ours[k], torch.stack(losses).mean(), atol=1e-4), k
        # lm+choice adds the gold option's mean per-token cross-entropy
        assert torch.allclose(both[k], torch.stack(losses).mean() + torch.stack(gold_nll).mean(), atol=1e-4), k
    with pytest.raises(TeacherError, match="lm objective needs a batch with one row per example"):
        task_losses(model, trainer.lora, trainer.factors, batch, "lm")


@pytest.mark.parametrize("objective", ["choice", "lm+choice"])
def test_choice_run_records_its_objective_and_the_multitask_lora_follows(objective, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    from llgbm_ext.models.registry import load_base_model

    tasks = ("category_food", "category_animal")
    report = train_teachers(_config(tiny_model_dir, tasks, objective=objective), tmp_path / "t", progress=False)
    assert all(0 <= r["teacher_accuracy"] <= 1 for r in report.rows)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert {info["objective"] for info in manifest["tasks"].values()} == {objective}
    assert all(r["final_loss"] < r["first_loss"] for r in report.rows)  # it trains

    teachers = load_teacher_set(tmp_path / "t")
    config = multitask_config(teachers, list(tasks), steps=2, batch=4, seed=0)
    assert config.objective == objective
    model, tokenizer = load_base_model(tiny_model_dir)
    from llgbm_ext.teachers.multitask import task_format, training_task

    encoded = [encode_task(training_task(t, None), tokenizer, task_format(teachers, t), 48, tokenizer.pad_token_id,
                           objective) for t in tasks]
    trainer = MixtureTrainer(model, teachers.layout, encoded, config, tmp_path / "m")
    batch = trainer.batch(0)
    assert batch.gold.numel() == 4 and batch.row_example.unique().numel() == 4
    mixed = trainer.tasks[0]
    first = len(encoded[0].lengths)
    assert torch.equal(mixed.gold[len(encoded[0]):], encoded[1].gold + first)  # the second task's rows come after

    # a step in chunks of a few option rows equals the step in one forward (loss and new weights)
    whole, chunked = (MixtureTrainer(model, teachers.layout, encoded, config, tmp_path / n) for n in "wc")
    loss_whole = whole.train_step()
    monkeypatch.setattr(multitask, "CHOICE_ROWS", 5)
    loss_chunked = chunked.train_step()
    assert torch.allclose(loss_whole, loss_chunked, atol=1e-5) and torch.isfinite(loss_whole).all()
    for proj, (a, b) in whole.factors.items():
        assert torch.allclose(b, chunked.factors[proj][1], atol=1e-6) and b.abs().max() > 0


def test_lm_digest_is_unchanged_and_other_objectives_change_it():
    lm = TeacherConfig(base_model="tiny", tasks=("a",))
    assert "objective" not in lm.training_digest()  # runs from before the objective existed still continue
    objectives = ("lm", "choice", "lm+choice")
    digests = {TeacherConfig(base_model="tiny", tasks=("a",), objective=o).digest() for o in objectives}
    assert len(digests) == 3


def test_bad_inputs_give_one_line_errors(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(TeacherError, match=r"objective must be one of lm, choice, lm\+choice"):
        TeacherConfig(base_model="tiny", tasks=("a",), objective="kl")
    exact = Task("sums", "exact", train=[Example("1 + 1 =", "2")])
    with pytest.raises(TeacherError, match="sums: the choice objective needs multiple-choice"):
        encode_choices(exact, tokenizer, FMT, 48, tokenizer.pad_token_id)
    lm = encode_task(_task("t", ["red", "dog"]), tokenizer, FMT, 48, tokenizer.pad_token_id)
    choice = encode_choices(_task("t", ["red", "dog"]), tokenizer, FMT, 48, tokenizer.pad_token_id)
    with pytest.raises(TeacherError, match="mixes tasks encoded for the choice objective"):
        make_batch([lm, choice], [np.array([0]), np.array([0])])


def test_cli_takes_the_objective():
    args = build_parser().parse_args(["teachers", "--base-model", "tiny", "--synthetic", "--tasks", "word_food",
                                      "--out", "x", "--objective", "lm+choice"])
    assert config_from_args(args).objective == "lm+choice"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["teachers", "--base-model", "tiny", "--synthetic", "--tasks", "word_food",
                                   "--out", "x", "--objective", "kl"])
