"""Plugin hardening: the layout comes from the DnD script, row fingerprints, the environment check.

These tests need no DnD checkout: scripts are written like DnD's (same imports and config keys) into a
temporary folder. The comparisons with DnD's own scripts are at the end and skip without dnd_repo/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT, requires_dnd

from llgbm_ext.dnd.config import DnDPluginConfig, load_plugin_config
from llgbm_ext.dnd.runner import RunnerError
from llgbm_ext.dnd.runner import main as runner_main
from llgbm_ext.dnd.script import ScriptError, ScriptLayout, resolve_layout
from llgbm_ext.models.registry import resolve_base_model

DND = REPO_ROOT / "dnd_repo"

# a marker that shows whether the script started, then the parts of a DnD task script that fix the
# generator's tokens (contract §2.1)
SCRIPT = '''import os
open(os.environ["LLGBM_TEST_MARKER"], "w").close()
if os.environ.get("LLGBM_TEST_DND"):
    from workspace.dnd.tokenizer import {tokenizer} as Tokenizer
config = {{
    "token_size": {token_size},
    "model_config": {{"features": [(32, 1000, 384), (2048, 32, 256), {output}], "kernel_size": 11}},
}}
'''
MATH_1_5B = {"tokenizer": "Qwen2515LoRA_Tokenizer2D", "token_size": "(18, 258)", "output": "(4508, 18, 258)"}
ARC_0_5B = {"tokenizer": "Qwen2505LoRA_Tokenizer2D", "token_size": "(10, 130)", "output": "(4296, 10, 130)"}


def dnd_script(tmp_path: Path, name: str = "train_qwen1.5lora_Math.py", **declared) -> Path:
    """A script in a checkout whose folder is not named Drag-and-Drop-LLMs (the runner links one)."""
    root = tmp_path / "checkout"
    (root / "workspace" / "dnd").mkdir(parents=True, exist_ok=True)
    script = root / "workspace" / "main" / "tasks" / "family" / name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(SCRIPT.format(**{**MATH_1_5B, **declared}))
    return script


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "script-ran"
    monkeypatch.setenv("LLGBM_TEST_MARKER", str(path))
    return path


# --- the layout follows the script ---------------------------------------------------------------------

def test_script_layout_is_read_without_running_it(tmp_path, marker):
    declared = ScriptLayout.read(dnd_script(tmp_path))
    assert declared == ScriptLayout("Qwen2515LoRA_Tokenizer2D", (18, 258), (4508, 18, 258))
    assert declared.layout_name == "qwen2.5-1.5b" and not marker.exists()
    custom = dnd_script(tmp_path, "train_x_Y.py", tokenizer="MyTokenizer", token_size="TINY.token_size",
                        output="(n, 10, 66)")
    assert ScriptLayout.read(custom) == ScriptLayout()  # not DnD's tokenizer, no literals: nothing declared
    broken = custom.with_name("train_broken.py")
    broken.write_text("config = {\n")
    with pytest.raises(ScriptError, match="train_broken.py: cannot read it as a Python script"):
        ScriptLayout.read(broken)


def test_layout_auto_is_the_script_tokenizers_else_the_base_models(tmp_path):
    math, arc = dnd_script(tmp_path), dnd_script(tmp_path, "train_qwen0.5lora_ARC-e.py", **ARC_0_5B)
    root = math.parents[3]
    weight_only = DnDPluginConfig(lambda_delta=0)
    assert weight_only.layout == "auto"  # the default
    assert resolve_layout(weight_only, math, root).layout == "qwen2.5-1.5b"
    assert resolve_layout(weight_only, arc, root).layout == "qwen2.5-0.5b"
    plain = dnd_script(tmp_path, "train_x_Y.py", tokenizer="MyTokenizer", token_size="size", output="shape")
    assert resolve_layout(weight_only, plain, root).layout == "auto"  # nothing needs it
    behaviour = DnDPluginConfig(base_model="tiny", lambda_delta=0.1)
    assert resolve_layout(behaviour, plain, root).layout == str(resolve_base_model("tiny"))
    assert resolve_layout(DnDPluginConfig(lambda_delta=0, layout="qwen2.5-1.5b"), math, root).layout == "qwen2.5-1.5b"


@pytest.mark.parametrize("setting, conflict", [
    ("layout=qwen2.5-0.5b", ("its tokenizer Qwen2515LoRA_Tokenizer2D tokenizes qwen2.5-1.5b LoRAs; "
                             "token_size (18, 258); generator output (4508, 18, 258), but the plugin config's "
                             "layout 'qwen2.5-0.5b' makes 4296 tokens of (10, 130)")),
    ("layout=qwen2.5-7b", "its tokenizer Qwen2515LoRA_Tokenizer2D tokenizes qwen2.5-1.5b LoRAs"),
])
def test_a_config_that_disagrees_with_the_script_is_refused_before_it_runs(tmp_path, marker, capsys, setting,
                                                                            conflict):
    script = dnd_script(tmp_path)
    assert runner_main(["--set", "lambda_delta=0", "--set", setting, str(script)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"llgbm_ext.dnd.runner: error: {script}: {conflict}")
    assert not marker.exists()


def test_only_the_generator_output_can_disagree(tmp_path, marker, capsys):
    script = dnd_script(tmp_path, tokenizer="MyTokenizer", token_size="(18, 258)", output="(4096, 18, 258)")
    assert runner_main(["--set", "lambda_delta=0", "--set", "layout=qwen2.5-1.5b", str(script)]) == 2
    assert "generator output (4096, 18, 258), but the plugin config's layout 'qwen2.5-1.5b' makes 4508 tokens" in \
        capsys.readouterr().err
    assert not marker.exists()


def test_the_script_layout_must_fit_the_base_model_before_it_runs(tmp_path, marker):
    """The issue's case: a 1.5B script with a config that does not name a 1.5B base model."""
    with pytest.raises(RunnerError, match="layout 'qwen2.5-1.5b' does not fit base model"):
        from llgbm_ext.dnd.runner import run_dnd_script

        run_dnd_script(dnd_script(tmp_path), [], DnDPluginConfig(base_model="tiny"))
    assert not marker.exists()


def test_a_matching_config_runs_the_script(tmp_path, marker, monkeypatch):
    script = dnd_script(tmp_path)
    monkeypatch.delenv("NUM_PROCESSES", raising=False)
    # only the trainer hook, which needs no DnD classes: the fake checkout has none
    assert runner_main(["--set", "lambda_delta=0", "--set", "hooks=[log_terms]", str(script)]) == 0
    assert marker.exists()


# --- against DnD's own scripts ---------------------------------------------------------------------------

SHIPPED = {  # plugin config -> the DnD script it is meant for
    "common_sense_reasoning.yaml": "tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py",
    "math1.5B.yaml": "tasks/math/train_qwen1.5lora_Math.py",
    "coding1.5B.yaml": "tasks/coding/train_qwen1.5lora_Coding.py",
}


@requires_dnd
def test_dnd_scripts_declare_the_layouts_of_their_tokenizers():
    main = DND / "workspace" / "main"
    for script in sorted(main.rglob("*.py")):  # every script parses
        ScriptLayout.read(script)
    scripts = {p.name: p for p in sorted((main / "tasks").rglob("train_*.py"))}
    tasks = {name: ScriptLayout.read(p) for name, p in scripts.items()}
    assert tasks["train_qwen1.5lora_Math.py"] == tasks["train_qwen1.5lora_Coding.py"] == \
        ScriptLayout("Qwen2515LoRA_Tokenizer2D", (18, 258), (4508, 18, 258))
    assert tasks["train_qwen7lora_Math.py"].output == (4928, 18, 514)
    for name, declared in tasks.items():
        if declared.layout_name:
            assert resolve_layout(DnDPluginConfig(lambda_delta=0), scripts[name], DND).layout == \
                declared.layout_name
    for config, script in SHIPPED.items():
        cfg = load_plugin_config(REPO_ROOT / "workspace_overrides" / "llgbm" / "configs" / config)
        assert resolve_layout(cfg, main / script, DND).layout == cfg.layout  # checked against the script


@requires_dnd
def test_dnd_math_script_with_the_commonsense_config_is_refused_before_dnd_setup(tmp_path):
    """Without the check, DnD's script would start its set-up (chdir, config.json, bitsandbytes)."""
    config = load_plugin_config(REPO_ROOT / "workspace_overrides" / "llgbm" / "configs" /
                                "common_sense_reasoning.yaml", ["lambda_delta=0"])
    from llgbm_ext.dnd.runner import run_dnd_script

    with pytest.raises(ScriptError, match="train_qwen1.5lora_Math.py: its tokenizer Qwen2515LoRA_Tokenizer2D"):
        run_dnd_script(DND / "workspace" / "main" / "tasks" / "math" / "train_qwen1.5lora_Math.py", [], config)


# --- per-task scripts ----------------------------------------------------------------------------------

# DnD's generation scripts find the root by this folder name (contract §6.11); this one records where it ran
GENERATE = '''import json, os, sys
root = os.sep + os.sep.join(__file__.split(os.sep)[1 : __file__.split(os.sep).index("Drag-and-Drop-LLMs") + 1])
os.chdir(root)
with open(os.environ["LLGBM_TEST_LOG"] + ".generate", "a") as f:
    f.write(json.dumps({"cwd": os.getcwd(), "args": sys.argv[1:]}) + "\\n")
'''
MARKED = "# with --llgbm: EXEC_FILE=\"-m llgbm_ext.dnd.runner ...\"\n"


def task_checkout(tmp_path: Path, launch_multi: str) -> Path:
    """A DnD checkout named dnd-checkout, with the given launch_multi.sh and a recording generation script."""
    root = tmp_path / "dnd-checkout"
    (root / "workspace" / "dnd").mkdir(parents=True)
    main = root / "workspace" / "main"
    (main / "generate").mkdir(parents=True)
    (main / "launch_multi.sh").write_text(launch_multi)
    (main / "generate" / "qwen0.5lora_generation_common_sense_reasoning.py").write_text(GENERATE)
    return root


def run_task_script(root: Path, tmp_path: Path) -> tuple[list[str], list[dict]]:
    """scripts/common_sense_reasoning/ARC-e/training_and_generation.sh from ``root`` with `accelerate`
    and `llgbm` stubs that log their arguments; returns (the log, the generation records)."""
    import json
    import os
    import subprocess
    import sys

    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name in ("accelerate", "llgbm"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "$LLGBM_TEST_LOG"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "LLGBM_TEST_LOG": str(log),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    script = REPO_ROOT / "scripts" / "common_sense_reasoning" / "ARC-e" / "training_and_generation.sh"
    subprocess.run(["bash", str(script)], cwd=root, env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in Path(f"{log}.generate").read_text().splitlines()]
    return log.read_text().splitlines(), records


def assert_generation_and_eval(root: Path, log: list[str], records: list[dict]) -> None:
    assert [r["args"] for r in records] == [["--eval_dataset", f"ARC-e{s}", "--test_dataset", "ARC-e"] for s in (1000, 2000)]
    assert all(Path(r["cwd"]) == root.resolve() for r in records)  # DnD's root discovery found the checkout
    assert log[-1].startswith("llgbm eval --base-model ./models/Qwen2.5-0.5B-Instruct --tasks ARC-e") and \
        "--generated ./generated/common_sense_reasoning/ARC-e1000T_on_ARC-eV " \
        "./generated/common_sense_reasoning/ARC-e2000T_on_ARC-eV" in log[-1]


@pytest.mark.parametrize("patched", [True, False])
def test_task_script_trains_through_the_patched_launcher_or_ours_and_generates_in_any_folder(tmp_path, patched):
    root = task_checkout(tmp_path, '#!/bin/bash\necho "launch_multi.sh $*" >> "$LLGBM_TEST_LOG"\n'
                         + (MARKED if patched else ""))
    log, records = run_task_script(root, tmp_path)
    config = root / "workspace" / "llgbm" / "configs" / "common_sense_reasoning.yaml"
    train = "tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py"
    if patched:
        assert log[0] == f"launch_multi.sh {train} 4 --llgbm --llgbm-config {config}"
    else:
        assert log[0].startswith("accelerate launch --multi_gpu --mixed_precision=bf16 --num_processes=4 ")
        assert log[0].endswith(f"-m llgbm_ext.dnd.runner --llgbm-config {config} {train}")
    assert len(log) == 2
    assert_generation_and_eval(root, log, records)


@requires_dnd
def test_task_script_with_dnds_patched_launcher(tmp_path):
    """DnD's own launch_multi.sh with patches/llgbm-flag.patch applied is the one that launches."""
    import subprocess

    root = task_checkout(tmp_path, (DND / "workspace" / "main" / "launch_multi.sh").read_text())
    subprocess.run(["git", "apply", str(REPO_ROOT / "patches" / "llgbm-flag.patch")], cwd=root, check=True,
                   capture_output=True)
    log, records = run_task_script(root, tmp_path)
    config = root / "workspace" / "llgbm" / "configs" / "common_sense_reasoning.yaml"
    assert log[0].startswith("accelerate launch --multi_gpu --num_processes=4 ")  # DnD's flag order
    assert log[0].endswith(f"--mixed_precision=bf16 -m llgbm_ext.dnd.runner --llgbm-config {config} "
                           "tasks/common_sense_reasoning/train_qwen0.5lora_ARC-e.py")
    assert_generation_and_eval(root, log, records)


# --- llgbm dnd check-env -------------------------------------------------------------------------------

# DnD's requirements.txt lines that pin versions, and lines the check must skip (DnD's own, verbatim)
DND_REQUIREMENTS = """# python==3.12

positional_encodings[pytorch]
transformers==4.49.0
safetensors
numpy<2.0.0
accelerate==1.2.1
av<15.0.0

llamafactory[torch,metrics] @ git+https://github.com/hiyouga/LLaMA-Factory.git@v0.9.2
git+https://github.com/open-compass/VLMEvalKit.git@v0.2
"""
DND_STACK = {"llgbm-ext": "0.1.0", "torch": "2.5.1", "transformers": "4.49.0", "accelerate": "1.2.1", "peft": "0.12.0",
             "numpy": "1.26.4", "tokenizers": "0.21.0", "safetensors": "0.4.5", "tqdm": "4.67.1", "pyyaml": "6.0.2"}


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """(versions, dnd_root): check-env sees the installed packages of ``versions`` (editable) and
    llgbm-ext's real declared requirements; llamafactory is not installed."""
    from llgbm_ext.dnd import environment as env

    versions = dict(DND_STACK)
    monkeypatch.setattr(env, "installed", versions.get)
    (tmp_path / "requirements.txt").write_text(DND_REQUIREMENTS)
    return versions, tmp_path


def test_check_env_passes_dnds_pinned_stack_and_names_what_breaks_it(environment, capsys):
    from llgbm_ext.cli import main as llgbm_main
    from llgbm_ext.dnd.environment import check_packages

    versions, root = environment
    checks = {c.name: c for c in check_packages(root)}
    assert all(not c.problems for c in checks.values()), [c.line() for c in checks.values()]
    assert [who for who, _ in checks["transformers"].needs] == ["llgbm_ext", "DnD", "LLaMA-Factory 0.9.2"]
    assert "pyyaml" in checks and "av" not in checks  # the plugin's packages and DnD's pins among them
    assert llgbm_main(["dnd", "check-env", "--dnd-root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "llgbm dnd check-env: no problems"

    versions.update(peft="0.15.0", transformers="4.50.0", numpy="2.0.1")  # what `pip install -e .` would do
    del versions["tqdm"]
    assert llgbm_main(["dnd", "check-env", "--dnd-root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  peft 0.15.0: LLaMA-Factory 0.9.2 <=0.12.0,>=0.11.1 (not met)" in out
    assert "FAIL  transformers 4.50.0: llgbm_ext >=4.49.0; DnD ==4.49.0 (not met); LLaMA-Factory 0.9.2" in out
    assert "FAIL  numpy 2.0.1: llgbm_ext >=1.26; DnD <2.0.0 (not met)" in out
    assert "FAIL  tqdm (not installed): llgbm_ext >=4.66" in out
    assert out.splitlines()[-1] == "llgbm dnd check-env: 4 problem(s)"


def test_check_env_reports_modules_that_do_not_import(environment, monkeypatch, capsys):
    from llgbm_ext.cli import main as llgbm_main
    from llgbm_ext.dnd import environment as env

    assert env.check_imports() == []  # this environment runs the plugin
    monkeypatch.setattr(env, "PLUGIN_MODULES", ("runner", "no_such_module"))
    assert llgbm_main(["dnd", "check-env"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  import llgbm_ext.dnd.{runner,no_such_module}" in out
    assert "llgbm_ext.dnd.no_such_module: ModuleNotFoundError" in out


def test_check_env_bad_requirements_file_is_one_line(environment, capsys):
    from llgbm_ext.cli import main as llgbm_main

    _, root = environment
    (root / "requirements.txt").write_text("transformers===\n")
    assert llgbm_main(["dnd", "check-env", "--dnd-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root / 'requirements.txt'}: cannot read requirement 'transformers==='" in err
