"""Repository contract: the README's two set-up commands, CI running exactly the test one (after filling
dnd_repo/ from a DnD snapshot when there is one), and scripts/fetch_dnd.sh."""

import configparser
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, dnd_available

SNAPSHOT = REPO_ROOT.parent / "shared" / "dnd" / "Drag-and-Drop-LLMs-60e2192.tar.gz"
FETCH = "bash scripts/fetch_dnd.sh --if-present"


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all(c.startswith("bash scripts/setup.sh") for c in commands)
    assert "llgbm demo" in commands[0] and "pytest" in commands[1]


def test_ci_fills_dnd_then_runs_the_readme_test_command():
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [FETCH, _readme_commands()[1]]


@pytest.mark.skipif(not SNAPSHOT.is_file(), reason=f"no DnD snapshot at {SNAPSHOT}")
def test_dnd_tests_run_where_the_snapshot_exists():
    """Where CI has the DnD snapshot, the tests that compare with DnD's code must run, not skip."""
    assert dnd_available(), f"dnd_repo/ is empty although {SNAPSHOT} exists: run `bash scripts/fetch_dnd.sh`"


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


# --- scripts/fetch_dnd.sh -------------------------------------------------------------------------

def _snapshot(path: Path, members: dict[str, str]) -> Path:
    """A .tar.gz whose members are ``{name: text}``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            file = path.parent / "member"
            file.write_text(text)
            tar.add(file, arcname=name)
    return path


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A checkout with the script and an empty dnd_repo/, as a fresh clone has it."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "dnd_repo").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "fetch_dnd.sh", root / "scripts")
    return root


def _fetch(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "fetch_dnd.sh"), *args], check=False, capture_output=True,
                          text=True)


GOOD = {"Drag-and-Drop-LLMs/workspace/dnd/tokenizer/__init__.py": "tok", "Drag-and-Drop-LLMs/scripts/a.sh": "a"}


def test_fetch_dnd_fills_the_empty_folder_once(checkout, tmp_path):
    snapshot = _snapshot(tmp_path / "dnd.tar.gz", GOOD)
    done = _fetch(checkout, str(snapshot))
    assert done.returncode == 0, done.stderr
    assert (checkout / "dnd_repo" / "workspace" / "dnd" / "tokenizer" / "__init__.py").read_text() == "tok"
    assert (checkout / "dnd_repo" / "scripts" / "a.sh").read_text() == "a"
    assert sorted(p.name for p in checkout.iterdir()) == ["dnd_repo", "scripts"]  # no staging folder left
    (checkout / "dnd_repo" / "scripts" / "a.sh").write_text("edited")
    again = _fetch(checkout, str(_snapshot(tmp_path / "other.tar.gz", {**GOOD, "Drag-and-Drop-LLMs/x": "x"})))
    assert again.returncode == 0 and "already populated" in again.stdout
    assert (checkout / "dnd_repo" / "scripts" / "a.sh").read_text() == "edited"
    assert not (checkout / "dnd_repo" / "x").exists()


def test_fetch_dnd_missing_snapshot(checkout, tmp_path):
    missing = tmp_path / "none.tar.gz"
    done = _fetch(checkout, str(missing))
    assert done.returncode == 1 and done.stderr.strip() == f"fetch_dnd: DnD snapshot {missing} does not exist"
    optional = _fetch(checkout, "--if-present", str(missing))
    assert optional.returncode == 0 and "will skip" in optional.stdout
    assert list((checkout / "dnd_repo").iterdir()) == []


@pytest.mark.parametrize("members, match", [
    ({"Drag-and-Drop-LLMs/scripts/a.sh": "a"}, "not a DnD snapshot"),
    ({**GOOD, "other/README.md": "r"}, "one top folder"),
])
def test_fetch_dnd_refuses_other_archives(checkout, tmp_path, members, match):
    done = _fetch(checkout, str(_snapshot(tmp_path / "bad.tar.gz", members)))
    assert done.returncode == 1 and match in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert list((checkout / "dnd_repo").iterdir()) == []
    assert sorted(p.name for p in checkout.iterdir()) == ["dnd_repo", "scripts"]


def test_fetch_dnd_leaves_a_non_empty_folder_alone(checkout, tmp_path):
    (checkout / "dnd_repo" / "notes.txt").write_text("mine")
    done = _fetch(checkout, str(_snapshot(tmp_path / "dnd.tar.gz", GOOD)))
    assert done.returncode == 1 and "not empty" in done.stderr
    assert [p.name for p in (checkout / "dnd_repo").iterdir()] == ["notes.txt"]
