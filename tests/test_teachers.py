"""Teacher training: batched LoRA steps equal PEFT's, both layouts and the manifest load back, a killed run
resumes to the same files, the real-task path, and one-line errors for bad input."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llgbm_ext.cli import main
from llgbm_ext.data.records import Example, Task
from llgbm_ext.data.synthetic import SuiteConfig, get_synthetic_task
from llgbm_ext.data.teacher_set import load_teacher_set
from llgbm_ext.delta.cache import DeltaCache
from llgbm_ext.delta.deltas import DeltaComputer
from llgbm_ext.delta.probes import get_probe_set
from llgbm_ext.delta.teacher import adapter_ids, delta_context
from llgbm_ext.lora.adapters import load_adapter, read_safetensors
from llgbm_ext.lora.layout import peft_key
from llgbm_ext.lora.tokens import lora_to_tokens, tokens_to_lora
from llgbm_ext.teachers import pipeline
from llgbm_ext.teachers.batches import encode_task, make_batch, step_indices
from llgbm_ext.teachers.config import TeacherConfig, TeacherError
from llgbm_ext.teachers.pipeline import prompt_format, teacher_layout, train_teachers
from llgbm_ext.teachers.train import GroupTrainer, clip_per_task, init_factors, learning_rate

SMALL = dict(warmup_steps=8, snapshot_every=2, snapshots=3, batch_size=4, lr=2e-2, lr_warmup=2, max_length=48,
             save_every=4, eval_limit=8, probes=None)


def _config(model_dir, tasks=("shift_1", "category_food"), **overrides):
    return TeacherConfig(base_model=str(model_dir), tasks=tasks, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One small run on two synthetic tasks (an exact and a multiple-choice one), with deltas."""
    out = tmp_path_factory.mktemp("teachers")
    report = train_teachers(_config(tiny_model_dir, probes="generic"), out, progress=False)
    return out, report


def test_both_layouts_and_manifest_load_back(run_dir):
    out, report = run_dir
    teachers = load_teacher_set(out)
    assert teachers.task_names() == ["shift_1", "category_food"] and teachers.layout == report.layout
    assert [e.step for e in teachers.entries] == [10, 12, 14] * 2
    assert teachers.prompts("shift_1") == get_synthetic_task("shift_1").conditions
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["tasks"]["category_food"]
    assert info["dnd_folder"] == "data/synthetic-category/category_food" and info["family"] == "category"
    assert info["format"]["answer_style"] == "option" and info["eval_examples"] == 8
    assert 0 <= info["base_accuracy"] <= 1 and 0 <= info["teacher_accuracy"] <= 1
    layout = teachers.layout
    for entry, record in zip(teachers.entries, manifest["adapters"]):
        peft = load_adapter(entry.path, layout)
        dnd = load_adapter(out / record["dnd_file"], layout)
        assert peft.config["r"] == layout.rank and peft.config["lora_alpha"] == layout.alpha
        assert json.loads((entry.path / "prompts.json").read_text())["task"] == entry.task
        assert all(torch.equal(peft.state_dict[k], dnd.state_dict[k]) for k in layout.keys())
        back = tokens_to_lora(lora_to_tokens(dnd.state_dict, layout), layout)  # DnD's token layout round trip
        assert max((back[k] - v).abs().max().item() for k, v in dnd.state_dict.items()) < 1e-5
        assert record["loss"] > 0
    dnd_files = sorted(p.name for p in (out / "data" / "synthetic-shift" / "shift_1").iterdir())
    assert dnd_files == ["10.safetensors", "12.safetensors", "14.safetensors"]
    # snapshots of one trajectory differ, and B is no longer zero
    a, b = (read_safetensors(out / "data" / "synthetic-shift" / "shift_1" / f"{s}.safetensors") for s in (10, 14))
    key = peft_key(0, "q_proj", "B")
    assert a[key].abs().sum() > 0 and not torch.equal(a[key], b[key])


def test_groups_in_worker_processes_write_the_same_teachers(tiny_model_dir, tmp_path):
    """Two groups trained side by side in two processes give byte-identical snapshots, losses and scores
    to the same groups trained one after the other in this process."""
    config = _config(tiny_model_dir, tasks=("shift_1", "category_food", "category_colour"), tasks_per_group=2,
                     snapshots=2, eval_limit=4)
    files = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        report = train_teachers(config, out, progress=False, workers=workers)
        written = [p for p in sorted(out.rglob("*")) if p.is_file() and ".state" not in p.parts]  # not resume state
        files[workers] = {p.relative_to(out): p.read_bytes() for p in written
                          if p.suffix == ".safetensors" or p.name == "loss.jsonl"}
        files[workers]["rows"] = json.dumps(report.rows, sort_keys=True).encode()
    assert len(files[1]) > 10 and files[1] == files[2]


def test_a_second_run_keeps_the_scores_unless_what_they_depend_on_changed(tiny_model_dir, tmp_path, monkeypatch):
    config = _config(tiny_model_dir, tasks=("category_food", "category_colour"), snapshots=2, eval_limit=4)
    first = train_teachers(config, tmp_path, progress=False).rows
    assert all(len(r["eval_key"]) == 16 for r in first)
    scored = []
    real = pipeline.evaluate_teachers
    monkeypatch.setattr(pipeline, "evaluate_teachers",
                        lambda model, tokenizer, layout, tasks, *a: scored.append([t.name for t in tasks])
                        or real(model, tokenizer, layout, tasks, *a))
    assert train_teachers(config, tmp_path, progress=False).rows == first and scored == []  # nothing changed
    final = tmp_path / "category_colour" / "category_colour_001" / "adapter_model.safetensors"
    tensors = read_safetensors(final)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1.0  # an edited teacher is scored again, the other one is not
    save_file(tensors, str(final))
    rows = train_teachers(config, tmp_path, progress=False).rows
    assert scored == [["category_colour"]] and rows[0] == first[0] and rows[1]["eval_key"] != first[1]["eval_key"]
    train_teachers(replace(config, eval_limit=3), tmp_path, progress=False)  # other examples: both again
    assert scored[-1] == ["category_food", "category_colour"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(0 <= info["gain_se"] <= 0.5 for info in manifest["tasks"].values())
    del manifest["tasks"]["category_food"]["gain_se"]  # scored before the gain's SE was recorded: scored again
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    train_teachers(replace(config, eval_limit=3), tmp_path, progress=False)
    assert scored[-1] == ["category_food"]


def test_shared_init_is_identical_across_tasks_and_recorded(run_dir, tiny_model_dir):
    out, report = run_dir
    layout = report.layout
    names = ["shift_1", "category_food", "rank_2"]
    shared = init_factors(layout, names, seed=0)
    again = init_factors(layout, list(reversed(names)), seed=0)
    for proj, (a, b) in shared.items():
        assert all(torch.equal(a[0], a[k]) for k in range(1, 3)) and not b.any()  # one A for all tasks, B = 0
        assert torch.equal(a[0], again[proj][0][0])  # reproducible, whatever the task order
        assert not torch.equal(a[0], init_factors(layout, names, seed=1)[proj][0][0])  # the seed matters
    per_task = init_factors(layout, names, seed=0, init="per-task")["q_proj"][0]
    assert not torch.equal(per_task[0], per_task[1])  # the ablation: each task draws its own
    teachers = load_teacher_set(out)
    assert teachers.init == {"kind": "shared", "seed": 0, "path": "init"}
    start = load_adapter(teachers.init_adapter, layout).state_dict
    assert torch.equal(start[peft_key(0, "q_proj", "A")], shared["q_proj"][0][0, 0])
    assert not start[peft_key(0, "q_proj", "B")].any()


def test_per_task_init_records_no_shared_adapter(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tasks=("category_food",), init="per-task", warmup_steps=0, snapshots=1,
                     eval_limit=0)
    train_teachers(config, tmp_path, progress=False)
    teachers = load_teacher_set(tmp_path)
    assert teachers.init == {"kind": "per-task", "seed": 0} and teachers.init_adapter is None
    assert not (tmp_path / "init").exists()
    with pytest.raises(TeacherError, match="init must be one of"):
        _config(tiny_model_dir, init="random")


def test_loss_falls_and_logs(run_dir):
    out, report = run_dir
    for row in report.rows:
        assert row["final_loss"] < row["first_loss"] - 0.2, row
        lines = [json.loads(line) for line in (out / row["task"] / "loss.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, 15))


def test_deltas_are_cached(run_dir, tiny_model, tiny_model_dir):
    out, report = run_dir
    model, tokenizer = tiny_model
    computer = DeltaComputer(model, tokenizer, report.layout, get_probe_set("generic"))
    context = delta_context(computer, str(tiny_model_dir), tiny_model_dir)
    cache = DeltaCache(out / "deltas")
    assert sorted(e.task for e in cache.entries(context)) == ["category_food"] * 3 + ["shift_1"] * 3
    paths = [e.path for e in load_teacher_set(out).entries]
    cached = cache.get_many(adapter_ids(paths, report.layout), context)
    fresh = computer.teacher_probe_deltas(paths[-1:], progress=False)[0].numpy()  # per probe (P, H)
    assert len(cached) == 6 and np.allclose(cached[adapter_ids(paths[-1:], report.layout)[0]], fresh, atol=1e-5)


def test_batched_steps_equal_peft(tiny_model_dir):
    """Three steps of two tasks at once equal three PEFT LoRA steps on each task alone (same init and batches)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llgbm_ext.models.registry import load_base_model

    config = _config(tiny_model_dir, max_grad_norm=0.5, weight_decay=0.01, lr=5e-3)
    base, tokenizer = load_base_model(tiny_model_dir)
    layout = teacher_layout(tiny_model_dir, config)
    small = SuiteConfig(n_train=16, n_test=4, n_conditions=4)
    encoded = [encode_task(get_synthetic_task(t, small), tokenizer, prompt_format(config), 48, tokenizer.pad_token_id)
               for t in config.tasks]
    trainer = GroupTrainer(base, layout, encoded, config, "/nonexistent")
    init = {p: (a.detach().clone(), b.detach().clone()) for p, (a, b) in trainer.factors.items()}
    batches = [trainer.batch(s) for s in range(3)]
    ours = [trainer.train_step() for _ in range(3)]

    for k, task in enumerate(encoded):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=layout.rank, lora_alpha=layout.alpha, lora_dropout=0.0,
                                                      target_modules=list(layout.targets)))
        named = dict(peft_model.named_parameters())
        params = []
        for i in range(layout.num_layers):
            for proj in layout.targets:
                for f, j in (("A", 0), ("B", 1)):
                    weight = named[peft_key(i, proj, f).replace(f"lora_{f}.", f"lora_{f}.default.")]
                    with torch.no_grad():
                        weight.copy_(init[proj][j][k, i])
                    params.append(weight)
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
        rows = slice(k * config.batch_size, (k + 1) * config.batch_size)
        for step, batch in enumerate(batches):
            ids, mask, predicts = batch.input_ids[rows], batch.attention_mask[rows], batch.predicts[rows]
            labels = torch.full_like(ids, -100)
            labels[:, 1:][predicts[:, :-1]] = ids[:, 1:][predicts[:, :-1]]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            assert abs(loss.item() - ours[step][k].item()) < 1e-5
        for i in range(layout.num_layers):
            for proj in layout.targets:
                for f, j in (("A", 0), ("B", 1)):
                    weight = named[peft_key(i, proj, f).replace(f"lora_{f}.", f"lora_{f}.default.")]
                    assert (weight - trainer.factors[proj][j][k, i]).abs().max().item() < 1e-5, (k, i, proj, f)


def test_clip_per_task_clips_each_task_alone():
    factors = {"q_proj": (torch.zeros(2, 1, 2, 3, requires_grad=True), torch.zeros(2, 1, 3, 2, requires_grad=True))}
    a, b = factors["q_proj"]
    a.grad = torch.stack([torch.full((1, 2, 3), 3.0), torch.full((1, 2, 3), 0.01)])
    b.grad = torch.stack([torch.full((1, 3, 2), 4.0), torch.full((1, 3, 2), 0.01)])
    norms = clip_per_task(factors, 1.0)
    assert torch.allclose(norms, torch.tensor([150 ** 0.5, 12 ** 0.5 * 0.01]))
    assert torch.allclose(torch.cat([a.grad[0].flatten(), b.grad[0].flatten()]).norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(a.grad[1], torch.full((1, 2, 3), 0.01))  # below the limit: untouched


def test_batches_cover_each_epoch_and_ignore_other_tasks():
    first_epoch = [step_indices(10, 4, 0, "t", s) for s in range(3)]
    flat = list(first_epoch[0]) + list(first_epoch[1]) + list(first_epoch[2][:2])
    assert sorted(flat) == list(range(10))  # steps walk through a permutation
    assert list(step_indices(10, 4, 0, "t", 1)) == list(first_epoch[1])  # a function of (seed, task, step)
    assert list(step_indices(10, 4, 0, "u", 1)) != list(first_epoch[1])


def test_sequences_mask_the_prompt(tiny_model):
    _, tokenizer = tiny_model
    task = Task("t", "mc", train=[Example("Pick one\nA: red\nB: dog", "[A]", choices=("red", "dog"), answer=0)])
    fmt = replace(prompt_format(_config("tiny")), answer_style="option")
    encoded = encode_task(task, tokenizer, fmt, 64, tokenizer.pad_token_id)
    batch = make_batch([encoded], [step_indices(1, 1, 0, "t", 0)])
    target = tokenizer(" red", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert batch.targets.tolist() == target
    assert tokenizer.decode(batch.input_ids[0][: -len(target)]).endswith("B: dog\nAnswer:")
    short = encode_task(task, tokenizer, fmt, 4, tokenizer.pad_token_id)  # the context loses its beginning
    assert short.lengths.tolist() == [4] and short.ids[0, -len(target):].tolist() == target


def test_interrupted_run_resumes_to_the_same_files(tiny_model_dir, tmp_path, monkeypatch):
    config = _config(tiny_model_dir, eval_limit=0)
    train_teachers(config, tmp_path / "whole", progress=False)

    calls = {"n": 0}
    append = pipeline.append_losses

    def crash_at_step_6(out, tasks, step, losses, lr):
        if step == 6:
            raise KeyboardInterrupt
        append(out, tasks, step, losses, lr)

    monkeypatch.setattr(pipeline, "append_losses", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_teachers(config, tmp_path / "resumed", progress=False)
    assert json.loads((tmp_path / "resumed" / ".state" / "group_000" / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(pipeline, "append_losses", append)
    original = GroupTrainer.train_step

    def counted(self):
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(GroupTrainer, "train_step", counted)
    train_teachers(config, tmp_path / "resumed", progress=False)
    assert calls["n"] == config.total_steps - 4  # continued from the state saved at step 4

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".state" not in p.parts}

    whole, resumed = files(tmp_path / "whole"), files(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and len(whole) > 10
    assert [k for k in whole if whole[k] != resumed[k]] == []

    train_teachers(config, tmp_path / "resumed", progress=False)  # finished: nothing is trained again
    assert calls["n"] == config.total_steps - 4
    with pytest.raises(TeacherError, match="other settings .changed: lr"):
        train_teachers(replace(config, lr=1e-2), tmp_path / "resumed", progress=False)


# --- the real-task path and the command line ---------------------------------------------------------
ARC = [("Which is a colour?", ["red", "dog", "sun", "car"], 0), ("Which animal barks?", ["cat", "dog", "cow", "fish"], 1),
       ("What is hot?", ["ice", "snow", "fire", "rain"], 2), ("Which is a number?", ["tree", "blue", "book", "seven"], 3)]
BOOLQ = [("is the sky blue", True), ("is fire cold", False), ("do dogs bark", True), ("is ice hot", False)]


def _write_dnd_files(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    arc = [{"prompt": q + "".join(f"\n{'ABCD'[i]}: {o}" for i, o in enumerate(opts)), "response": f"[{'ABCD'[g]}]",
            "system": "pick"} for q, opts, g in ARC]
    boolq = [{"prompt": q + "?", "response": f"[{a}]", "system": "true or false"} for q, a in BOOLQ]
    for name, records in (("ARC-e_train", arc * 3), ("ARC-e_test", arc), ("BoolQ_train", boolq * 3),
                          ("BoolQ_validation", boolq)):
        (root / f"{name}.json").write_text(json.dumps(records, indent=4))
    return root


def test_real_tasks_from_dnd_files(tiny_model_dir, tmp_path, capsys):
    data = _write_dnd_files(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["teachers", "--base-model", str(tiny_model_dir), "--data-dir", str(data), "--tasks", "arc_e", "BoolQ",
                 "--out", str(out), "--warmup-steps", "2", "--snapshot-every", "1", "--snapshots", "2", "--batch-size", "2",
                 "--no-deltas", "--no-progress", "--max-prompts", "5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "arc_e" in printed and "boolq" in printed and "teacher" in printed
    teachers = load_teacher_set(out)
    assert teachers.task_names() == ["arc_e", "boolq"]
    info = teachers.tasks["arc_e"]
    assert info["format"]["answer_style"] == "cloze" and info["kind"] == "mc" and info["family"] == "common_sense_reasoning"
    assert teachers.prompts("arc_e") == [q + "".join(f"\n{'ABCD'[i]}: {o}" for i, o in enumerate(opts)) for q, opts, _ in ARC] + \
        [ARC[0][0] + "".join(f"\n{'ABCD'[i]}: {o}" for i, o in enumerate(ARC[0][1]))]
    assert teachers.tasks["boolq"]["eval_examples"] == 4
    for folder in ("common_sense_reasoning/ARC-e", "common_sense_reasoning/BoolQ"):
        assert sorted(p.name for p in (out / "data" / folder).iterdir()) == ["3.safetensors", "4.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--tasks", "shift_9"], "unknown synthetic task 'shift_9'"),
    (["--data-dir", "{data}", "--tasks", "foo"], "unknown task 'foo'"),
    (["--data-dir", "{data}", "--tasks", "obqa"], "task obqa has no train file"),
    (["--data-dir", "{data}", "--tasks", "piqa"], "PIQA_train.json: no records"),
])
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys, args, message):
    data = _write_dnd_files(tmp_path / "data")
    (data / "PIQA_train.json").write_text("[]")
    args = [a.replace("{data}", str(data)) for a in args]
    code = main(["teachers", "--base-model", str(tiny_model_dir), *args, "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
