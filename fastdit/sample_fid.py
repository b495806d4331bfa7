"""`torchrun -m fastdit.sample_fid`: N samples for FID on any number of ranks, into an ADM .npz; the code is fastdit.generate.sample_fid.

This file only keeps the command's name: imported, `fastdit.sample_fid` is fastdit.generate.sample_fid itself.
"""
import sys

from fastdit.generate import sample_fid as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
