"""`torchrun -m fastdit.sample_fid`: N samples for FID on any number of ranks, into an ADM .npz.

The command keeps its name here; its code is fastdit.generate.sample_fid, which
`import fastdit.sample_fid` gives itself.
"""
import sys

from fastdit.generate import sample_fid as _module

if __name__ == "__main__":
    sys.exit(_module.main())
sys.modules[__name__] = _module
