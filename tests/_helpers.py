"""Small helpers shared by the test modules (imported as `_helpers`; pytest puts tests/ on sys.path)."""
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
