"""fastdit: fast training of Diffusion Transformers (DiT) with fused Triton kernels and DeepSpeed."""
import os as _os

__version__ = "0.1.0"

# In a source checkout the top-level `kernels/` folder is `fastdit.kernels` (pyproject.toml maps it the
# same way on install). Let the package find it when imported straight from the tree.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "kernels"))
        and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py"))):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821
