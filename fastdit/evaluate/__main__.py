"""`python -m fastdit.evaluate REF.npz SAMPLES.npz`: FID / IS / precision-recall (fastdit.evaluate.run)."""
import sys

from fastdit.evaluate.run import main

sys.exit(main())
