from pathlib import Path

import pytest
import torch

from extract.model_loading import build_random_esm2, fair_esm_checkpoint

PHAGE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "phage"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random ESM-2 saved in fair-esm's own `.pt` layout."""
    path = tmp_path_factory.mktemp("model") / "tiny_esm2.pt"
    torch.save(fair_esm_checkpoint(build_random_esm2(2, 64, 4, seed=1)), path)
    return path


@pytest.fixture(scope="session")
def phage_dir() -> Path:
    if not PHAGE_DIR.is_dir():
        pytest.skip(f"real phage data not found at {PHAGE_DIR}")
    return PHAGE_DIR
