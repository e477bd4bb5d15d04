"""Shared fixtures: one tokenizer / example cache for the whole session, real text when
../shared/data is present (WikiText-2), the embedded default corpus otherwise."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from overture.config import load_recipe
from overture.data.corpus import default_corpus_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# measured matmul peaks (overture/peak.py) go to a file of this session, not the user's
_PEAK_DIR = tempfile.mkdtemp(prefix="overture-peak-")
atexit.register(shutil.rmtree, _PEAK_DIR, True)
os.environ["OVERTURE_PEAK_FILE"] = os.path.join(_PEAK_DIR, "peak.json")


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch):
    # Tests choose their cache folder through the recipe, never the user's.
    monkeypatch.delenv("OVERTURE_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("overture-cache")


@pytest.fixture(scope="session")
def real_text(cache_dir) -> Path:
    """WikiText-2 validation text when ../shared/data exists, else the embedded corpus."""
    return WIKITEXT_VALID if WIKITEXT_VALID.is_file() else default_corpus_path(cache_dir)


@pytest.fixture(scope="session")
def make_recipe(cache_dir, real_text):
    """bert-tiny on real text with a shared cache; extra KEY=VALUE overrides on top."""

    def make(output_dir: Path | str = "unused", *overrides: str):
        return load_recipe("bert-tiny", list(overrides), defaults=[
            f"data.corpus=[{real_text}]", f"data.cache_dir={cache_dir}",
            f"output_dir={output_dir}", "data.num_proc=1", "tokenizer.vocab_size=2048"])

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir, real_text):
    """A family's tiny recipe trained for a few steps, once per session: run folder."""
    from helpers import tiny
    from overture.engine import train

    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            run = tmp_path_factory.mktemp(f"trained-{family}") / "run"
            train(tiny(family, run, cache_dir, real_text, "train.max_steps=4",
                       "train.save_every=0", "train.eval_every=0", "train.log_every=2"),
                  progress=False)
            runs[family] = run
        return runs[family]

    return get
