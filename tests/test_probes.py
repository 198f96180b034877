"""Probe sets: built-in data, user files, the content hash, and the one encoding function."""

import json
from dataclasses import replace

import pytest
import torch

from llgbm_ext.delta.probes import (
    ProbeError,
    ProbeSet,
    builtin_probe_sets,
    encode_probes,
    get_probe_set,
    load_probe_file,
)
from llgbm_ext.errors import LLGBMError

SUFFIX = "\n\n### Instruction:\nPlease provide a response. Input:Input.\n\n### Response:"


def test_generic_is_five_alpaca_probes():
    probes = get_probe_set("generic")
    assert len(probes) == 5 and not probes.chat_template and probes.max_length == 256
    assert all(text.endswith(SUFFIX) for text in probes.texts)
    preambles = {text[: -len(SUFFIX)] for text in probes.texts}
    assert len(preambles) == 5
    paper = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    assert paper in preambles


@pytest.mark.parametrize("domain", ["math", "code", "commonsense"])
def test_domain_sets(domain):
    probes = get_probe_set(f"domain:{domain}")
    assert probes.name == f"domain:{domain}"
    assert len(set(probes.texts)) == 5
    assert f"domain:{domain}" in builtin_probe_sets()
    assert probes.hash != get_probe_set("generic").hash


def test_unknown_set_lists_the_choices():
    for spec in ("domain:poetry", "math", "domain:generic"):
        with pytest.raises(ProbeError, match="domain:math"):
            get_probe_set(spec)


def test_hash_covers_what_changes_the_result_and_nothing_else(tmp_path):
    generic = get_probe_set("generic")
    assert generic.hash == get_probe_set("generic").hash and len(generic.hash) == 16
    assert replace(generic, name="renamed").hash == generic.hash
    changed = [
        replace(generic, texts=generic.texts[:4]),
        replace(generic, texts=generic.texts[::-1]),
        replace(generic, chat_template=True),
        replace(generic, max_length=128),
        replace(generic, truncation_side="left"),
    ]
    assert len({p.hash for p in changed} | {generic.hash}) == len(changed) + 1
    assert get_probe_set("generic", max_length=128).hash == changed[3].hash
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(list(generic.texts)))
    assert get_probe_set(copy).hash == generic.hash  # same content from a user file: same hash


def test_user_files(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(["first probe", "second probe"]))
    probes = get_probe_set(str(as_list))
    assert probes.texts == ("first probe", "second probe") and probes.name == str(as_list)
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"probes": ["only"], "chat_template": True, "max_length": 16}))
    probes = load_probe_file(as_dict)
    assert probes.texts == ("only",) and probes.chat_template and probes.max_length == 16


@pytest.mark.parametrize(
    "content, reason",
    [
        ("", "empty probe file"),
        ("   \n", "empty probe file"),
        ("[]", "probe list is empty"),
        ('["ok", 3]', "probe 1 must be a non-empty string"),
        ('["ok", ""]', "probe 1 must be a non-empty string"),
        ('["ok",', "not valid JSON"),
        ('{"texts": ["a"]}', "unknown key 'texts'"),
        ('{"chat_template": true}', "missing key 'probes'"),
        ('{"probes": {"a": 1}}', "expected a list"),
        ('{"probes": ["a"], "max_length": 0}', "max_length must be a positive integer"),
        ('{"probes": ["a"], "chat_template": "yes"}', "chat_template must be true or false"),
        ('{"probes": ["a"], "truncation_side": "middle"}', "truncation_side"),
        ('"just a string"', "expected a list"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "probes.json"
    path.write_text(content)
    with pytest.raises(ProbeError) as info:
        get_probe_set(path)
    message = str(info.value)
    assert isinstance(info.value, LLGBMError) and "\n" not in message
    assert str(path) in message and reason in message


def test_missing_file(tmp_path):
    with pytest.raises(ProbeError, match="no such probe file"):
        load_probe_file(tmp_path / "absent.json")


def test_probe_set_validates_itself():
    with pytest.raises(ProbeError, match="no probe texts"):
        ProbeSet("empty", ())
    with pytest.raises(ProbeError, match="probe 0"):
        ProbeSet("blank", ("  ",))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_encode_pads_each_probe_alone(tiny_model, padding_side):
    _, tokenizer = tiny_model
    probes = get_probe_set("generic")
    batch = encode_probes(probes, tokenizer, padding_side)
    lengths = batch.attention_mask.sum(1)
    assert batch.input_ids.shape == (5, int(lengths.max()))
    assert len(set(lengths.tolist())) > 1  # the paraphrases differ in length, so padding is exercised
    for i, text in enumerate(probes.texts):
        alone = tokenizer(text)["input_ids"]
        real = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert real == alone
        mask = batch.attention_mask[i].tolist()
        if 0 in mask:  # a padded row: real tokens first (right padding) or last (left padding)
            assert mask == sorted(mask, reverse=padding_side == "right")


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation(tiny_model, side):
    _, tokenizer = tiny_model
    probes = get_probe_set("generic", max_length=7, truncation_side=side)
    batch = encode_probes(probes, tokenizer)
    assert batch.input_ids.shape == (5, 7) and bool(batch.attention_mask.all())
    full = tokenizer(probes.texts[0])["input_ids"]
    assert batch.input_ids[0].tolist() == (full[:7] if side == "right" else full[-7:])


def test_chat_template_switch(tiny_model):
    _, tokenizer = tiny_model
    probes = get_probe_set("generic", chat_template=True)
    batch = encode_probes(probes, tokenizer)
    for i, text in enumerate(probes.texts):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        expected = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert batch.input_ids[i][batch.attention_mask[i].bool()].tolist() == expected
    raw = encode_probes(get_probe_set("generic"), tokenizer)
    assert batch.input_ids.shape[1] > raw.input_ids.shape[1]


def test_chat_template_needs_a_template(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ProbeError, match="has none"):
        encode_probes(get_probe_set("generic", chat_template=True), tokenizer)


def test_bad_padding_side(tiny_model):
    with pytest.raises(ProbeError, match="padding_side"):
        encode_probes(get_probe_set("generic"), tiny_model[1], "middle")


def test_batch_dtypes(tiny_model):
    batch = encode_probes(get_probe_set("domain:code"), tiny_model[1])
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert len(batch) == 5 and batch.to("cpu").padding_side == "right"
