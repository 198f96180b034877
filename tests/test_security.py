"""Security: tensors are never read through pickle, the repository holds no secrets, importing the
package opens no connection, and a hub id on a machine without the hub is a one-line error."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "llgbm_ext"


def _calls(name: str):
    """(file, line, call node) of every call of a dotted ``name`` (e.g. ``torch.load``) in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path.relative_to(REPO_ROOT), node.lineno, node


def _keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def test_tensors_are_read_without_pickle():
    loads = list(_calls("torch.load"))
    assert loads, "the package reads criterion_weight.pt and optimizer.pt with torch.load"
    for path, line, call in loads:
        assert _keyword(call, "weights_only") is True, f"{path}:{line}: torch.load without weights_only=True"
    for name in ("np.load", "numpy.load"):
        for path, line, call in _calls(name):
            assert _keyword(call, "allow_pickle") is False, f"{path}:{line}: {name} without allow_pickle=False"
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|marshal|shelve)\b|\bread_pickle\(|\bpickle\.loads?\(", re.M)
    for path in sorted(PACKAGE.rglob("*.py")):
        found = unsafe.search(path.read_text(encoding="utf-8"))
        assert found is None, f"{path.relative_to(REPO_ROOT)}: {found.group(0).strip()}"


SECRET = re.compile(
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face token
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub token
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|sk-[A-Za-z0-9_-]{32,}"  # OpenAI-style secret key
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack token
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
SKIP_DIRS = {".git", ".venv", "venv", "dnd_repo", "build", "dist", "__pycache__", ".pytest_cache", "runs"}


def test_no_secrets_in_the_repository():
    scanned = 0
    for root, dirs, files in os.walk(REPO_ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(root) / name
            if path.stat().st_size > 2_000_000:
                continue
            text = path.read_bytes().decode("utf-8", errors="ignore")
            found = SECRET.search(text)
            assert found is None, f"{path.relative_to(REPO_ROOT)}: looks like a secret ({found.group(0)[:12]}...)"
            scanned += 1
    assert scanned > 50


# A fresh interpreter with every way out blocked: imports every module of the package, then asks the
# CLI for a hub model that is not cached, with HF_HUB_OFFLINE unset. Prints what tried to connect.
NO_NETWORK = """
import contextlib, importlib, io, json, pkgutil, socket, sys

attempts = []
def refuse(kind):
    def blocked(*args, **kwargs):
        attempts.append(f"{kind} {args[1:2] or args[:1]}")
        raise OSError(f"network blocked by the test ({kind})")
    return blocked
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect_ex")
socket.create_connection = refuse("create_connection")
socket.getaddrinfo = refuse("getaddrinfo")

import llgbm_ext
modules = [m.name for m in pkgutil.walk_packages(llgbm_ext.__path__, "llgbm_ext.") if not m.name.endswith("__main__")]
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = repr(e)
imports = list(attempts)

from llgbm_ext.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["model", "nobody/no-such-model"])
print(json.dumps({"modules": modules, "failed": failed, "import_attempts": imports, "attempts": attempts,
                  "code": code, "stderr": err.getvalue()}))
"""


def test_import_opens_no_connection_and_uncached_hub_id_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", NO_NETWORK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) > 40 and not result["failed"], result["failed"]
    assert result["import_attempts"] == [], result["import_attempts"]

    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2 and len(lines) == 1, result["stderr"]
    assert lines[0].startswith("llgbm model: error: nobody/no-such-model: hub model not found in the local Hugging Face cache")
    assert result["attempts"] == [], result["attempts"]  # not even a lookup was tried
