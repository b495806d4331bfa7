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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
