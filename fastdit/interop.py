"""`python -m fastdit.interop`: DiT weights between fastdit, the official code and diffusers.

The command keeps its name here; its code is fastdit.weights.interop, which `import fastdit.interop` gives itself.
"""
import sys

from fastdit.weights import interop as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
