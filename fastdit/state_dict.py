"""State dicts: the strict key and shape check every weight load goes through, and wrapper prefixes.

check_state_dict_keys serves the DiT models (their strict load_state_dict), every reader in
fastdit.weights and the FID Inception network: one message format for a mismatched file. It sits
beside them, imported by all three, so that no model file holds a helper the others need.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch

PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed wrappers, torch.compile


def check_state_dict_keys(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor],
                          what: str = "state dict",
                          may_be_missing: Callable[[str], bool] = lambda key: False) -> None:
    """Raise a KeyError naming every missing/unexpected key and a ValueError on shape mismatches.

    `what` names the weights in the messages; `may_be_missing(key)` exempts keys that may be absent.
    """
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state_dict) if not may_be_missing(k))
    extra = sorted(set(state_dict) - set(own))
    if missing or extra:
        msg = [f"{what} does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if extra:
            msg.append(f"unexpected keys ({len(extra)}): {_short(extra)}")
        raise KeyError("; ".join(msg))
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{what} shape mismatch ({len(bad)}): {_short(bad)}")


def _short(items: Iterable[str], limit: int = 20) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def strip_prefixes(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove a `module.` (DDP/DeepSpeed) or `_orig_mod.` (torch.compile) prefix shared by all keys."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict
