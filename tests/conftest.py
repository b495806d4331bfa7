"""Test setup: run Triton kernels through the interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is imported anywhere, so it happens here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests run tiny models: one intra-op thread is fastest and never oversubscribes the cores
    # (measured here: a 30-step tiny-DiT training test took 16 s on 2 threads under load, 2 s on 1).
    torch.set_num_threads(1)
# The Triton attention is off on CUDA unless asked for (a wrong output on an H100: fastdit.models.attention); the
# suite asks, so its tests keep running there, and the known failing cases are marked as such (_helpers.KNOWN_CUDA_BUG).
os.environ.setdefault("FASTDIT_ATTENTION_TRITON", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _classifier_cache(tmp_path_factory):
    """The digits quality classifier (fastdit.evaluate.digits_quality) is trained once per session into a
    temporary cache that every test and subprocess shares, never into the user's ~/.cache."""
    saved = os.environ.get("FASTDIT_CACHE_DIR")
    os.environ["FASTDIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("fastdit-cache"))
    yield
    if saved is None:
        os.environ.pop("FASTDIT_CACHE_DIR", None)
    else:
        os.environ["FASTDIT_CACHE_DIR"] = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 on CUDA too: no TF32 in cuBLAS matmuls or cuDNN convolutions (the reference
    DiT's patch-embedding Conv2d allows it by default). Restored after each test; no-op on CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "triton: runs the Triton kernels (through the interpreter on CPU)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    from fastdit.kernels._common import interpreter_problem
    problem = interpreter_problem()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason=f"the Triton interpreter cannot run the kernels: {problem}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif problem and "triton" in item.keywords:
            item.add_marker(skip_triton)
