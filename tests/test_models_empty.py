"""fastdit.models.empty: a module built for loading is the module built as usual once every weight is loaded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from fastdit.models.empty import for_loading, hidden_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WithHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("table", torch.arange(4.0), persistent=False)
        self.scale = torch.full((2,), 0.5)


def test_plain_module_is_built_on_meta_and_filled_by_the_load():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    rng = torch.get_rng_state()
    empty = for_loading(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), "cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # nothing was initialised (no random draw)
    assert hidden_tensors(empty) == [] and all(p.device.type == "cpu" for p in empty.parameters())
    empty.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3)
    assert torch.equal(empty(x), eager(x))


def test_a_tensor_outside_the_state_dict_means_a_usual_build():
    assert hidden_tensors(WithHidden()) == ["table", "scale"]
    m = for_loading(WithHidden, "cpu")
    assert torch.equal(m.table, torch.arange(4.0)) and torch.equal(m.scale, torch.full((2,), 0.5))
    assert m.lin.weight.device.type == "cpu"
    nested = nn.Sequential(nn.Linear(2, 2), WithHidden())
    assert hidden_tensors(nested) == ["1.table", "1.scale"]


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_every_dit_block_type_holds_nothing_outside_its_state_dict(impl):
    """The models this project loads build on meta (for_loading's fast path applies to all of them)."""
    from fastdit.models.build import build_dit
    from fastdit.models.reference import BLOCK_TYPES

    opts = {"kernels": "torch"} if impl == "fast" else {}
    for block_type in BLOCK_TYPES:
        with torch.device("meta"):
            model = build_dit(impl, name="DiT-S/2", input_size=8, block_type=block_type, **opts)
        assert hidden_tensors(model) == [], block_type


def test_requires_grad_dtype_and_strides_survive_the_empty_storage():
    def build():
        m = nn.Sequential(nn.Linear(3, 4), nn.Embedding(5, 4).to(torch.float64))
        m[0].bias.requires_grad_(False)
        m[0].weight = nn.Parameter(torch.empty(3, 4).t())  # a column-major weight keeps its strides
        return m
    empty = for_loading(build, "cpu")
    assert [p.requires_grad for p in empty.parameters()] == [True, False, True]
    assert empty[0].weight.stride() == (1, 4)
    assert [p.dtype for p in empty.parameters()] == [torch.float32, torch.float32, torch.float64]
    assert not any(p.is_meta for p in empty.parameters())


def test_the_meta_build_skips_initialisers_that_would_import_dynamo():
    """Tensor.normal_ on a meta tensor (the DiT's label embedding, nn.init.normal_) imports torch._dynamo on its
    first call in a process (seconds); for_loading skips the fill, so a small model's build does not pay it."""
    code = textwrap.dedent("""
        import sys
        from fastdit.models.build import build_dit
        from fastdit.models.empty import for_loading
        from fastdit.models.registry import model_config
        if "torch._dynamo" in sys.modules:
            print("already imported"); sys.exit(0)
        for impl in ("reference", "fast"):
            for_loading(lambda: build_dit(impl, **model_config("DiT-S/2"), input_size=4), "cpu")
        print("imported" if "torch._dynamo" in sys.modules else "not imported")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.strip() == "already imported":
        pytest.skip("torch._dynamo is imported before any build here: nothing for for_loading to avoid")
    assert proc.stdout.strip() == "not imported"
