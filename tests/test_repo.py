"""Repository contract: the README's two set-up commands, and CI running exactly the test one."""

import configparser
import re

from conftest import REPO_ROOT


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all(c.startswith("bash scripts/setup.sh") for c in commands)
    assert "llgbm demo" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [_readme_commands()[1]]


def test_setup_cfg_declares_package_and_cli():
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == "llgbm-ext"
    assert "llgbm = llgbm_ext.cli:main" in cfg["options.entry_points"]["console_scripts"]
    requires = cfg["options"]["install_requires"]
    for package in ("torch", "transformers", "peft", "safetensors", "accelerate", "numpy", "tqdm", "pyyaml"):
        assert package in requires


def test_dnd_submodule_is_a_gitlink_only():
    gitmodules = (REPO_ROOT / ".gitmodules").read_text()
    assert "path = dnd_repo" in gitmodules and "jerryliang24/Drag-and-Drop-LLMs" in gitmodules
