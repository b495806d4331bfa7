"""`python -m fastdit.export`: a training checkpoint as a plain official-layout state dict.

The command keeps its name here; its code is fastdit.weights.export, which `import fastdit.export` gives itself.
"""
import sys

from fastdit.weights import export as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
