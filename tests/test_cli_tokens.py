"""``llgbm tokens encode|decode`` and the CLI's error contract (one line, exit 2, traceback only with --debug)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llgbm_ext.cli import main
from llgbm_ext.lora.adapters import load_adapter, save_dnd_checkpoint, save_peft_adapter
from llgbm_ext.lora.factors import random_factors, state_dict_from_factors
from llgbm_ext.lora.layout import get_layout

LAYOUT = get_layout("tiny")


@pytest.fixture
def adapter_dir(tmp_path):
    sd = state_dict_from_factors(random_factors(LAYOUT, std=0.05), LAYOUT)
    return save_peft_adapter(sd, tmp_path / "adapter", LAYOUT)


def test_encode_decode_round_trip(adapter_dir, tmp_path, capsys):
    assert main(["tokens", "encode", "--layout", "tiny", str(adapter_dir), str(tmp_path / "t.safetensors")]) == 0
    tokens = load_file(str(tmp_path / "t.safetensors"))["tokens"]
    assert tokens.shape == (LAYOUT.num_tokens, *LAYOUT.token_size)
    assert main(["tokens", "decode", "--layout", "tiny", str(tmp_path / "t.safetensors"), str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, sorted(LAYOUT.targets))
    original, decoded = load_adapter(adapter_dir, LAYOUT).state_dict, load_adapter(tmp_path / "out", LAYOUT).state_dict
    assert max((original[k] - decoded[k]).abs().max().item() for k in original) <= 1e-6
    assert "tokens (152, 10, 66)" in capsys.readouterr().out


def test_encode_accepts_dnd_flat_file_and_model_dir_layout(adapter_dir, tmp_path, tiny_model_dir):
    sd = load_adapter(adapter_dir, LAYOUT).state_dict
    save_dnd_checkpoint(sd, tmp_path / "data" / "7.safetensors", LAYOUT)
    out = tmp_path / "t.safetensors"
    assert main(["tokens", "encode", "--layout", str(tiny_model_dir), str(tmp_path / "data" / "7.safetensors"), str(out)]) == 0
    assert load_file(str(out))["tokens"].shape[0] == LAYOUT.num_tokens


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_adapter", "no such adapter file or directory"),
        ("unknown_layout", "unknown layout 'qwen9'"),
        ("wrong_rank", "rank 8 vs 4"),
        ("no_tokens_key", "no tensor named 'tokens'"),
        ("wrong_token_shape", "layout 'tiny' expects (152, 10, 66)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, expected, adapter_dir, tmp_path, capsys):
    bad_tokens = tmp_path / "bad.safetensors"
    argv = {
        "missing_adapter": ["tokens", "encode", "--layout", "tiny", str(tmp_path / "nope"), str(tmp_path / "o.safetensors")],
        "unknown_layout": ["tokens", "encode", "--layout", "qwen9", str(adapter_dir), str(tmp_path / "o.safetensors")],
        "wrong_rank": ["tokens", "encode", "--layout", "tiny", "--rank", "4", str(adapter_dir), str(tmp_path / "o.safetensors")],
        "no_tokens_key": ["tokens", "decode", "--layout", "tiny", str(bad_tokens), str(tmp_path / "out")],
        "wrong_token_shape": ["tokens", "decode", "--layout", "tiny", str(bad_tokens), str(tmp_path / "out")],
    }[case]
    save_file({"tokens" if case == "wrong_token_shape" else "weights": torch.zeros(3, 10, 66)}, str(bad_tokens))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "out").exists()


def test_console_entry_point_and_debug_flag(tmp_path):
    args = [sys.executable, "-m", "llgbm_ext", "tokens", "encode", "--layout", "tiny", str(tmp_path / "x"), str(tmp_path / "y")]
    quiet = subprocess.run(args, capture_output=True, text=True)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    loud = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "AdapterError" in loud.stderr
