"""`python -m fastdit.interop`: DiT weights between fastdit, the official code and diffusers; the code is fastdit.weights.interop.

This file only keeps the command's name: imported, `fastdit.interop` is fastdit.weights.interop itself.
"""
import sys

from fastdit.weights import interop as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
