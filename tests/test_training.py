"""Generator training on the tiny model: every mode learns, resume is exact, delta-guided saves forwards,
generated adapters load in PEFT."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fake_teachers import write_fake_teachers
from llgbm_ext.cli import main
from llgbm_ext.config import load_config
from llgbm_ext.errors import LLGBMError
from llgbm_ext.training import Trainer, TrainingConfig

FAST = ["encoder.kind=base-model", "encoder.model=tiny", "generator.embed_dim=128", "device=cpu",
        "optim.warmup_steps=2", "loss.noise=0"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return write_fake_teachers(tmp_path_factory.mktemp("teachers"))


def _config(teachers, out, *overrides):
    return load_config(TrainingConfig, None, [f"data.teachers={teachers}", f"out_dir={out}", *FAST, *overrides])


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode, key, lr", [("weight_only", "loss/weight", "1e-2"), ("multitask", "loss", "3e-3"),
                                           ("delta_only", "loss/delta", "3e-3"), ("delta_guided", "loss/pred", "1e-2")])
def test_every_mode_lowers_its_loss(mode, key, lr, teachers, tmp_path):
    # batch = all 6 teachers, so every step sees the same adapters and the loss must fall steadily
    cfg = _config(teachers, tmp_path, f"loss.mode={mode}", "steps=12", "batch_size=6", f"optim.lr={lr}",
                  "loss.delta_every=3", "save_every=12")
    Trainer(cfg, progress=False).setup().train()
    records = _losses(tmp_path)
    assert len(records) == 12 and all(r[key] == r[key] for r in records)  # logged, finite
    first, last = records[0][key], sum(r[key] for r in records[-3:]) / 3
    assert last < 0.95 * first, f"{mode}: {key} went from {first} to {last}"
    for r in records:
        assert {"lr", "grad_norm", "step_time", "base_forwards"} <= set(r)
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_resume_is_exact(teachers, tmp_path):
    args = ["loss.mode=multitask", "steps=6", "batch_size=2", "save_every=3", "loss.noise=1e-3"]
    straight = _config(teachers, tmp_path / "straight", *args)
    Trainer(straight, progress=False).setup().train()
    broken = _config(teachers, tmp_path / "broken", *args)
    Trainer(broken, progress=False).setup().train(until=4)  # stops after step 4; checkpoint at 3
    Trainer(broken, resume=True, progress=False).setup().train()
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "broken" / "checkpoints" / "step_0000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _losses(tmp_path / "broken")] == list(range(6))
    assert [r["loss"] for r in _losses(tmp_path / "broken")] == [r["loss"] for r in _losses(tmp_path / "straight")]


def test_delta_guided_uses_a_fraction_of_base_forwards(teachers, tmp_path):
    common = ["steps=8", "batch_size=2", "loss.delta_every=4", "save_every=8"]
    Trainer(_config(teachers, tmp_path / "only", "loss.mode=delta_only", *common), progress=False).setup().train()
    Trainer(_config(teachers, tmp_path / "guided", "loss.mode=delta_guided", *common), progress=False).setup().train()
    only, guided = _losses(tmp_path / "only")[-1]["base_forwards"], _losses(tmp_path / "guided")[-1]["base_forwards"]
    assert (only, guided) == (8, 2)


def test_cli_train_then_generate_loads_in_peft(teachers, tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel

    from llgbm_ext.models.registry import load_base_model

    run = tmp_path / "run"
    argv = ["train", "--no-progress", f"data.teachers={teachers}", f"out_dir={run}", *FAST,
            "loss.mode=weight_only", "steps=2", "batch_size=2", "data.held_out=[add_3]"]
    assert main(argv) == 0
    assert (run / "config.yaml").is_file() and json.loads((run / "run.json").read_text())["held_out"] == ["add_3"]
    assert main(["generate", "--generator", str(run), "--task", "add_3", "add_1", "--out", str(tmp_path / "gen")]) == 0
    base, _ = load_base_model(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(tmp_path / "gen" / "add_3"))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 28
    assert (tmp_path / "gen" / "dnd" / "add_1" / "0.safetensors").is_file()
    prompts = json.loads((tmp_path / "gen" / "add_3" / "prompts.json").read_text())
    assert prompts["task"] == "add_3" and len(prompts["prompts"]) == 8
    assert "run/checkpoints" not in capsys.readouterr().err


def test_bad_config_is_one_line(tmp_path, capsys):
    assert main(["train", f"out_dir={tmp_path}", "loss.mode=everything"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss.mode" in err and len(err.splitlines()) == 1


def test_kl_signal_with_offset_and_teacher_init_prior(tmp_path):
    """The demo's recipe: the generator starts from the teachers' shared initial A, learns a token offset
    at its own learning rate, and the KL signal (with the weight loss) lowers its loss."""
    from llgbm_ext.lora.adapters import load_adapter, save_peft_adapter
    from llgbm_ext.lora.factors import factors_from_state_dict
    from llgbm_ext.lora.layout import get_layout
    from llgbm_ext.lora.tokens import detokenize
    from llgbm_ext.teachers.train import initial_adapter

    root = write_fake_teachers(tmp_path / "teachers")
    overrides = ["loss.mode=multitask", "loss.signals=[kl]", "kl.examples=8", "kl.per_step=2", "steps=10",
                 "batch_size=6", "save_every=10", "optim.lr=3e-3", "optim.offset_lr=3e-2",
                 "generator.shared_offset=true", "generator.prior=teacher_init", "generator.prior_b_std=0.02"]
    with pytest.raises(LLGBMError, match="needs teachers trained from one shared initialisation"):
        Trainer(_config(root, tmp_path / "no-init", *overrides), progress=False).setup()
    manifest = json.loads((root / "manifest.json").read_text())
    tiny = get_layout("tiny")
    save_peft_adapter(initial_adapter(tiny, seed=0), root / "init", tiny)
    (root / "manifest.json").write_text(json.dumps({**manifest, "init": {"kind": "shared", "seed": 0, "path": "init"}}))
    trainer = Trainer(_config(root, tmp_path / "run", *overrides), progress=False).setup()
    generator = trainer.trainable.generator
    start = factors_from_state_dict(load_adapter(root / "init", tiny).state_dict, tiny)
    prior = detokenize(generator.prior[None], tiny)
    assert torch.allclose(prior["q_proj"][0][0], start["q_proj"][0], atol=1e-5)  # A: the teachers' start
    assert 0.01 < prior["q_proj"][1].std().item() < 0.04  # B ~ N(0, 0.02²)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups][-1] == pytest.approx(10 * groups[0]["lr"]) and groups[-1]["params"] == [generator.offset]
    trainer.train()
    records = _losses(tmp_path / "run")
    assert records[-1]["loss/kl"] < records[0]["loss/kl"] and generator.offset.abs().sum() > 0
