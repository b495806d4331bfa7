"""`python -m fastdit.sample`: a grid of samples from a checkpoint; the code is fastdit.generate.sample.

This file only keeps the command's name: imported, `fastdit.sample` is fastdit.generate.sample itself.
"""
import sys

from fastdit.generate import sample as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
