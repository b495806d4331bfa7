"""Small helpers shared by the test modules (imported as `_helpers`; pytest puts tests/ on sys.path)."""
import importlib.abc
import importlib.util
import sys

import torch


def randomize_weights_(model: torch.nn.Module, std: float, generator=None) -> torch.nn.Module:
    """Fill every parameter but the fixed sin-cos `pos_embed` with N(0, std^2), in place.

    adaLN-Zero's zero init makes outputs and many gradients exactly zero, which hides bugs.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


ATTENTION_LIBRARIES = ("flash_attn_interface", "flash_attn", "xformers.ops")


class _FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the named modules and raises the given exception when one is imported."""

    def __init__(self, errors: dict):
        self.errors = errors

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in self.errors else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.errors[module.__name__]


def fake_attention_probe(monkeypatch, libraries: dict, device="cpu"):
    """Make fastdit.models.attention probe afresh, with fakes in place of the optional libraries.

    libraries: import name -> fake module, or an exception its import raises (a broken install);
    a name not given is "not installed". device: where the probe's test calls run ("cpu" stands in
    for a CUDA device; None: no CUDA). Everything, the real probe cache included, is restored after.
    """
    from fastdit.models import attention
    monkeypatch.setattr(attention, "_MODULES", {})
    monkeypatch.setattr(attention, "_STATUS", {})
    monkeypatch.setattr(attention, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(attention, "_probe_device", lambda: None if device is None else torch.device(device))
    errors = {n: v for n, v in libraries.items() if isinstance(v, BaseException)}
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(errors)] + sys.meta_path)
    for name in ATTENTION_LIBRARIES:
        if name in errors:
            monkeypatch.delitem(sys.modules, name, raising=False)
        else:
            monkeypatch.setitem(sys.modules, name, libraries.get(name))  # None: ModuleNotFoundError
    return attention
