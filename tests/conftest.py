"""Shared fixtures: tiny configs with random weights, synthetic images, and the optional real data in ../shared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# The Hub is never reachable in tests: fail fast instead of retrying network calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pasam_hf import PASamConfig, PASamModel, PASamProcessor  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine they lose a lot (ten training steps:
# 0.6 s with one thread, 13 s with two while another process runs). PASAM_TEST_THREADS overrides. Subprocesses
# (CLI tests) inherit the same count through OMP_NUM_THREADS, so their float sums match this process's.
TEST_THREADS = int(os.environ.get("PASAM_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PASAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (hq-fixture/, davis345/), or skip when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hq_fixture(shared_data: Path) -> list[dict]:
    """The 8 image/mask pairs of hq-fixture: the manifest's `items`, with `image` and `mask` as absolute paths.

    Masks: 0 background, 255 foreground, 128 ignore (the manifest's own description)."""
    root = shared_data / "hq-fixture"
    if not (root / "manifest.json").is_file():
        pytest.skip("hq-fixture/manifest.json not found")
    items = json.loads((root / "manifest.json").read_text())["items"]
    return [{**item, "image": str(root / item["image"]), "mask": str(root / item["mask"])} for item in items]


def tiny_config(**adapter_kwargs) -> PASamConfig:
    return PASamConfig.small(image_size=128, hidden_size=32, **adapter_kwargs)


@pytest.fixture
def config() -> PASamConfig:
    return tiny_config()


@pytest.fixture
def model(config: PASamConfig) -> PASamModel:
    torch.manual_seed(0)
    return PASamModel(config).eval()


@pytest.fixture
def processor(config: PASamConfig) -> PASamProcessor:
    return PASamProcessor.from_model_config(config)


def synthetic_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with a bright disc on a textured background, and its exact mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 4) ** 2
    image[mask] = np.array([220, 180, 40], dtype=np.uint8)
    return image


@pytest.fixture
def image() -> np.ndarray:
    return synthetic_image()
