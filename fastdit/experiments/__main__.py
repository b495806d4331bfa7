import sys

from fastdit.experiments.runner import main

if __name__ == "__main__":
    sys.exit(main())
