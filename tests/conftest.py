"""Shared fixtures: offline mode, the plugin host, tiny random models, real data."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# the data cache (petune/datacache.py) is off in tests, never the user's folder and never shared between tests
# (a test that patches a task must not get another test's prepared data); tests/test_data_cache.py turns it
# on in a temporary folder
os.environ.setdefault("PETUNE_DATA_CACHE", "off")
# "auto" dtypes resolve the same on every CPU (float32), so a test's numbers do not depend on whether
# the CPU it runs on has native bf16; tests/test_precision.py pretends to be each kind of machine
os.environ.setdefault("PETUNE_CPU_BF16", "0")
# several xdist workers share the cores: one compute thread each (and in the petune processes they start).
# With two threads per process on a machine whose cores are all taken, every parallel region waits for a
# thread that is not running: a packaged-model smoke run took several times longer
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PETUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def host():
    from petune.plugins import PluginHost

    return PluginHost()


@pytest.fixture(scope="session")
def tiny_llama_path() -> Path:
    """A 2-layer Llama-like causal LM with random weights (cached)."""
    from petune_plugins.sources.random_init import RandomInitSource

    return RandomInitSource().resolve("random:tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert_path() -> Path:
    """A 2-layer BERT-like encoder with random weights (cached)."""
    from petune_plugins.sources.random_init import RandomInitSource

    return RandomInitSource().resolve("random:tiny-bert")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets in ../shared/data; tests using them skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set PETUNE_SHARED_DATA or put ../shared/data beside the repo)")
    return SHARED_DATA
