"""`python -m fastdit.export`: a training checkpoint as a plain official-layout state dict; the code is fastdit.weights.export.

This file only keeps the command's name: imported, `fastdit.export` is fastdit.weights.export itself.
"""
import sys

from fastdit.weights import export as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
