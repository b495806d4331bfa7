"""fastdit.models.build: build_dit, the one choice of the reference or the fast model.

The first test is the defect of issue #12: with the fast model broken, importing the reference failed
too (fastdit/models/__init__.py imported dit.py eagerly), so the "fast model cannot import, fall back to
the reference" branches could never run. They are gone: impl="auto" means the fast model for adaLN-Zero
blocks, an import failure is an error, and the reference imports and runs on its own.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdit.models import reference
from fastdit.models.build import build_dit, resolve_impl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(input_size=8, in_channels=4, num_classes=5)

BREAK_FAST_MODEL = textwrap.dedent("""
    import importlib.abc, sys

    class BrokenFastModel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastdit.models.dit":
                raise ImportError("the fast model is broken (test)")
            return None

    sys.meta_path.insert(0, BrokenFastModel())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", BREAK_FAST_MODEL + textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reference_imports_and_runs_without_the_fast_model():
    proc = _run("""
        import torch
        from fastdit.models.reference import DiT_models
        model = DiT_models["DiT-S/8"](input_size=8, num_classes=5).eval()
        out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4]))
        print("reference ok", tuple(out.shape))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference ok (2, 8, 8, 8)" in proc.stdout


def test_a_broken_fast_model_is_an_error_not_a_silent_fallback():
    proc = _run("""
        from fastdit.models.build import build_dit
        assert type(build_dit("reference", name="DiT-S/8", input_size=8)).__module__ == "fastdit.models.reference"
        try:
            build_dit("auto", name="DiT-S/8", input_size=8)
        except ImportError as e:
            print("auto:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auto: the fast model is broken (test)" in proc.stdout


def test_resolve_impl():
    assert resolve_impl("auto") == "fast" and resolve_impl("auto", "adaln_zero") == "fast"
    for block in ("adaln", "cross_attention", "in_context"):
        assert resolve_impl("auto", block) == "reference"
        assert resolve_impl("fast", block) == "fast"  # asked for: the fast model runs the reference block
    assert resolve_impl("reference") == "reference"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("eager")


def test_build_dit_is_the_registry_constructor():
    from fastdit.models import DiT as FastDiT
    from fastdit.models import DiT_models as FastDiT_models

    torch.manual_seed(3)
    want = reference.DiT_models["DiT-S/8"](**TINY)
    torch.manual_seed(3)
    got = build_dit("reference", name="DiT-S/8", kernels="torch", checkpointing=True, **TINY)
    assert type(got) is reference.DiT  # the fast model's options are dropped for the reference
    for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), k
    torch.manual_seed(3)
    fast = build_dit("auto", name="DiT-S/8", kernels="torch", **TINY)
    assert type(fast) is FastDiT and fast.kernels == "torch"
    torch.manual_seed(3)
    same = FastDiT_models["DiT-S/8"](**TINY)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(), fast.parameters()))
    custom = build_dit("auto", depth=1, hidden_size=32, num_heads=2, patch_size=2, block_type="adaln", **TINY)
    assert type(custom) is reference.DiT and custom.depth == 1
