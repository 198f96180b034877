"""Deltas: one code path for teacher files and generated factors, checked against PEFT; pristine base."""

import json
from dataclasses import replace

import pytest
import torch
from peft import PeftModel

from llgbm_ext.delta import deltas as deltas_module
from llgbm_ext.delta.activations import base_activation, base_probe_states
from llgbm_ext.delta.deltas import DeltaComputer, delta_settings, load_teacher_factors
from llgbm_ext.delta.probes import ProbeSet, encode_probes, get_probe_set
from llgbm_ext.errors import AdapterError
from llgbm_ext.lora.adapters import save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout
from llgbm_ext.models.registry import load_base_model

LAYOUT = get_layout("tiny")
PROBES = get_probe_set("generic")


def one(factors, k):
    return {proj: (a[k], b[k]) for proj, (a, b) in factors.items()}


@pytest.fixture
def factors():
    return random_factors(LAYOUT, 3, std=0.1)


@pytest.fixture
def adapter_paths(tmp_path, factors):
    """Three teacher adapters: two PEFT directories (the second with alpha 32, not the layout's 16)
    and one DnD flat file."""
    paths = [tmp_path / "a0", tmp_path / "a1", tmp_path / "dnd" / "3.safetensors"]
    save_peft_adapter(state_dict_from_factors(one(factors, 0), LAYOUT), paths[0], LAYOUT, dtype=torch.bfloat16)
    save_peft_adapter(state_dict_from_factors(one(factors, 1), LAYOUT), paths[1], LAYOUT)
    config_file = paths[1] / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"lora_alpha": 32}))
    save_dnd_checkpoint(state_dict_from_factors(one(factors, 2), LAYOUT), paths[2], LAYOUT)
    return paths


def peft_reference(model_dir, adapter_dir, probes=PROBES, per_probe=False):
    """The paper's recipe with PEFT on a fresh model: each probe alone, unpadded; v(adapted) - v(base),
    per probe (P, H) or averaged (H,)."""
    model, tokenizer = load_base_model(model_dir)
    probe_ids = [torch.tensor([tokenizer(text)["input_ids"]]) for text in probes.texts]

    def v(m):
        with torch.no_grad():
            return torch.stack([m(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].float()
                                for ids in probe_ids])

    v_base = v(model)  # before PEFT injects its layers into the model
    delta = v(PeftModel.from_pretrained(model, adapter_dir)) - v_base
    return delta if per_probe else delta.mean(0)


def test_teacher_and_student_deltas_share_one_path_and_match_peft(tiny_model, tiny_model_dir, adapter_paths, factors):
    model, tokenizer = tiny_model
    computer = DeltaComputer(model, tokenizer, LAYOUT, PROBES, padding_side="left")
    teacher = computer.teacher_deltas(adapter_paths, batch_size=2, progress=False)  # batches of 2 and 1
    assert teacher.shape == (3, LAYOUT.hidden_size) and teacher.dtype == torch.float32
    assert not teacher.requires_grad

    for k, path in enumerate(adapter_paths[:2]):
        torch.testing.assert_close(teacher[k], peft_reference(tiny_model_dir, path), rtol=0, atol=1e-5)

    as_files = load_teacher_factors(adapter_paths, LAYOUT, torch.float32, "cpu")
    student = computer.deltas(as_files)  # the same factors through the student entry point
    torch.testing.assert_close(student, teacher, rtol=0, atol=1e-6)
    # the same adapters as a generator would emit them: a0 rounded to bf16 as it was stored, and a1's
    # B doubled, since it was trained with alpha 32 = twice the layout's
    generated = {p: (a.clone(), b.clone()) for p, (a, b) in factors.items()}
    for a, b in generated.values():
        a[0], b[0] = a[0].bfloat16().float(), b[0].bfloat16().float()
        b[1] *= 2
    torch.testing.assert_close(computer.deltas(generated), teacher, rtol=0, atol=1e-5)


def test_per_probe_deltas_on_own_probe_sets_match_peft_one_adapter_at_a_time(tiny_model, tiny_model_dir,
                                                                            adapter_paths):
    """Each adapter on its own probe set (as task probes give every task's adapters their task's inputs),
    all in one forward, equals PEFT run one adapter and one probe at a time."""
    sets = [ProbeSet("task:a", ("Kind 2: cat red sun egg arm\nAnswer:", "Which word is a colour?", "Shift 1: a b")),
            ProbeSet("task:b", ("Which number is 2nd smallest?\nA: 4\nB: 17", "x", "Kind 5: sea pink rice soup cow"))]
    computer = DeltaComputer(*tiny_model, LAYOUT, sets, padding_side="left")
    deltas = computer.teacher_probe_deltas(adapter_paths[:2], sets=[1, 0], batch_size=2, progress=False)
    assert deltas.shape == (2, 3, LAYOUT.hidden_size)
    for k, (path, s) in enumerate(zip(adapter_paths[:2], [1, 0])):
        torch.testing.assert_close(deltas[k], peft_reference(tiny_model_dir, path, sets[s], per_probe=True),
                                   rtol=0, atol=1e-5)
    torch.testing.assert_close(computer.deltas(load_teacher_factors(adapter_paths[:2], LAYOUT, torch.float32, "cpu"),
                                               [1, 0]), deltas.mean(1), rtol=0, atol=1e-6)
    assert computer.all_settings[0].probe_hash != computer.all_settings[1].probe_hash
    with pytest.raises(ValueError, match="same number of probes"):
        DeltaComputer(*tiny_model, LAYOUT, [sets[0], PROBES])
    with pytest.raises(ValueError, match="one probe-set index per adapter"):
        computer.probe_deltas(load_teacher_factors(adapter_paths[:2], LAYOUT, torch.float32, "cpu"), [0])


def test_base_activation_stays_bit_identical(tiny_model, adapter_paths, factors):
    model, tokenizer = tiny_model
    batch = encode_probes(PROBES, tokenizer)
    before = base_activation(model, batch)
    computer = DeltaComputer(model, tokenizer, LAYOUT, PROBES)
    computer.teacher_deltas(adapter_paths, progress=False)
    trained = {p: (a.requires_grad_(), b.requires_grad_()) for p, (a, b) in factors.items()}
    computer.deltas(trained).sum().backward()
    after = base_activation(model, batch)
    assert torch.equal(before, after)
    assert torch.equal(computer.base_activation, before)


def test_student_deltas_are_differentiable(tiny_model, factors):
    computer = DeltaComputer(*tiny_model, LAYOUT, PROBES)
    trained = {p: (a.requires_grad_(), b.requires_grad_()) for p, (a, b) in factors.items()}
    deltas = computer.deltas(trained)
    assert deltas.shape == (3, LAYOUT.hidden_size) and deltas.requires_grad
    deltas[1].norm().backward()
    a, b = trained["down_proj"]
    assert a.grad[1].abs().sum() > 0 and b.grad[1].abs().sum() > 0
    assert a.grad[0].abs().sum() == 0 and b.grad[2].abs().sum() == 0  # other adapters' rows untouched


def test_a_zero_adapter_has_zero_delta(tiny_model, factors):
    computer = DeltaComputer(*tiny_model, LAYOUT, PROBES)
    zero_b = {p: (a, torch.zeros_like(b)) for p, (a, b) in factors.items()}
    assert torch.equal(computer.deltas(zero_b), torch.zeros(3, LAYOUT.hidden_size))


def test_padding_side_does_not_change_deltas(tiny_model, factors):
    left = DeltaComputer(*tiny_model, LAYOUT, PROBES, padding_side="left")
    right = DeltaComputer(*tiny_model, LAYOUT, PROBES, padding_side="right")
    with torch.no_grad():
        torch.testing.assert_close(left.deltas(factors), right.deltas(factors), rtol=0, atol=1e-5)
    assert left.settings.key != right.settings.key


def test_settings_key(tiny_model):
    model, _ = tiny_model
    settings = delta_settings(model, PROBES)
    assert settings.to_dict() == {
        "probe_set": "generic", "probe_hash": PROBES.hash, "layer": -1, "dtype": "float32", "chat_template": False,
        "max_length": 256, "truncation_side": "right", "padding_side": "right",
    }
    assert delta_settings(model, replace(PROBES, name="renamed")).key == settings.key
    others = [
        delta_settings(model, PROBES, layer=-2),
        delta_settings(model, PROBES, padding_side="left"),
        delta_settings(model, get_probe_set("generic", chat_template=True)),
        delta_settings(model, get_probe_set("domain:math")),
        replace(settings, dtype="bfloat16"),
    ]
    assert len({s.key for s in others} | {settings.key}) == len(others) + 1


def test_base_activation_computed_once(tiny_model_dir, monkeypatch):
    model, tokenizer = load_base_model(tiny_model_dir)  # a fresh model: nothing memoised for it yet
    calls = []
    monkeypatch.setattr(deltas_module, "base_probe_states", lambda *a: calls.append(1) or base_probe_states(*a))
    first = DeltaComputer(model, tokenizer, LAYOUT, PROBES)
    second = DeltaComputer(model, tokenizer, LAYOUT, PROBES)
    assert torch.equal(first.base_activation, second.base_activation) and len(calls) == 1
    DeltaComputer(model, tokenizer, LAYOUT, PROBES, layer=-2).base_activation  # other settings: computed anew
    assert len(calls) == 2


def test_known_base_activation_is_used(tiny_model_dir):
    model, tokenizer = load_base_model(tiny_model_dir)
    known = torch.full((len(PROBES), LAYOUT.hidden_size), 0.5)  # per probe, as the DeltaCache stores it
    computer = DeltaComputer(model, tokenizer, LAYOUT, PROBES, base_activation=known)
    assert torch.equal(computer.base_states(), known) and torch.equal(computer.base_activation, known[0])
    with pytest.raises(ValueError, match="expected"):
        DeltaComputer(model, tokenizer, LAYOUT, PROBES, base_activation=torch.zeros(3))


def test_teacher_edge_cases(tiny_model, adapter_paths):
    computer = DeltaComputer(*tiny_model, LAYOUT, PROBES)
    assert computer.teacher_deltas([], progress=False).shape == (0, LAYOUT.hidden_size)
    with pytest.raises(ValueError, match="batch_size"):
        computer.teacher_deltas(adapter_paths, batch_size=0)
    config_file = adapter_paths[0] / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        computer.teacher_deltas(adapter_paths[:1], progress=False)
