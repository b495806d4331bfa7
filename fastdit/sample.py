"""`python -m fastdit.sample`: a grid of samples from a checkpoint.

The command keeps its name here; its code is fastdit.generate.sample, which `import fastdit.sample` gives itself.
"""
import sys

from fastdit.generate import sample as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
