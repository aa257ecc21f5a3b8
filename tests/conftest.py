"""Fixtures shared by all test tiers."""

from __future__ import annotations

import pytest

from helpers import make_hf_model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: (path, hf_model) for a save_pretrained folder of a tiny V3 with the given overrides."""

    def make(seed: int = 0, name: str = "ckpt", **overrides):
        model = make_hf_model(seed, **overrides)
        path = tmp_path / name
        model.save_pretrained(path)
        return path, model

    return make
