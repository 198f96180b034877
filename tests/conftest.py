"""Shared fixtures. Tests run offline against a private cache, so they never touch the user's."""

import atexit
import os
import shutil
import tempfile

# Set before anything imports llgbm_ext / transformers, and inherited by CLI subprocesses.
if "LLGBM_CACHE" not in os.environ:
    os.environ["LLGBM_CACHE"] = tempfile.mkdtemp(prefix="llgbm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LLGBM_CACHE"], ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


# One thread: the suite's models are tiny, where thread overhead outweighs the parallel speed-up,
# and timings stay stable on machines shared with other work.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny model (random initialisation, ``tiny-random``), built once per session in the private cache."""
    from llgbm_ext.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) of the tiny model, frozen and in eval mode; do not modify it in tests."""
    from llgbm_ext.models.registry import load_base_model

    return load_base_model(tiny_model_dir)


def dnd_available() -> bool:
    return (REPO_ROOT / "dnd_repo" / "workspace" / "dnd" / "tokenizer").is_dir()


requires_dnd = pytest.mark.skipif(
    not dnd_available(),
    reason="dnd_repo/workspace is not populated (scripts/fetch_dnd.sh fills it from a DnD snapshot); "
           "see README 'Testing against DnD'",
)


@pytest.fixture(autouse=True)
def _restore_working_directory():
    """Tests that run DnD's scripts in-process (which chdir to their checkout) leave the working directory
    as they found it, so later tests' relative paths keep their meaning."""
    before = os.getcwd()
    yield
    if os.getcwd() != before:
        os.chdir(before)
