"""fastdit.models.registry: the paper's 12 configurations, their names and their sizes."""
import pytest

from fastdit.models import reference
from fastdit.models.registry import MODEL_NAMES, model_config


def test_registry_names_and_config():
    assert list(MODEL_NAMES) == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert list(reference.DiT_models) == list(MODEL_NAMES)
    assert model_config("DiT-XL/2") == dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16)
    with pytest.raises(KeyError, match="valid names: DiT-S/2"):
        model_config("DiT-M/3")
    with pytest.raises(KeyError, match="valid names"):
        reference.DiT_models["DiT-M/3"]
