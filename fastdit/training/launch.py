"""Start train.py on N local ranks through DeepSpeed's launcher, on a rendezvous port that is free.

    python -m fastdit.training.launch --num_gpus 2 --config configs/digits.json --resume auto [--set k=v ...]

`make digits` runs this. DeepSpeed's launcher (and torchrun) default to port 29500; when another job
holds it, every rank dies with a DistNetworkError (EADDRINUSE). This command asks the OS for a free port
and passes it as --master_port (an explicit --master_port P is kept). Every other argument goes to
fastdit/train.py unchanged. DeepSpeed's INFO/WARNING lines are hidden (FASTDIT_DEEPSPEED_LOG=info shows
them: fastdit/training/ds_logging.py). Returns the launcher's exit code (train.py's codes: see its docstring).
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from fastdit.dist import free_port

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


def split_args(argv: Sequence[str]) -> Tuple[int, Optional[int], List[str]]:
    """(--num_gpus, --master_port or None, the arguments for train.py)."""
    num, port, rest = 1, None, []
    it = iter(argv)
    for a in it:
        key, eq, val = a.partition("=")
        if key in ("--num_gpus", "--num-gpus", "--master_port", "--master-port"):
            if not eq:
                val = next(it, None)
            if val is None or not val.isdigit() or int(val) < 1:
                raise ValueError(f"{key} needs a positive integer (got {val!r})")
            if key.startswith("--num"):
                num = int(val)
            else:
                port = int(val)
        else:
            rest.append(a)
    return num, port, rest


def command(argv: Sequence[str]) -> List[str]:
    """The deepspeed launcher command line for `argv` (a free --master_port unless one is given)."""
    num, port, rest = split_args(argv)
    return [sys.executable, "-c", RUNNER, "--num_gpus", str(num),
            "--master_port", str(port or free_port()), TRAIN, *rest]


# DeepSpeed's launcher (deepspeed.launcher.runner), with its INFO lines quieted like the ranks'
# (fastdit.training.ds_logging: FASTDIT_DEEPSPEED_LOG=info brings them back).
RUNNER = ("import sys; from fastdit.training.ds_logging import quiet_deepspeed; quiet_deepspeed(); "
          "from deepspeed.launcher.runner import main; sys.exit(main())")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = command(argv)
        from fastdit.training.ds_logging import deepspeed_log_level
        deepspeed_log_level()  # a bad FASTDIT_DEEPSPEED_LOG: said here, once
    except ValueError as e:
        print(f"fastdit.training.launch: error: {e}", file=sys.stderr)
        return 2
    from fastdit.training.ds_logging import deepspeed_log_level, filter_stream

    # DeepSpeed's launcher starts a second launcher process whose INFO lines no in-process filter reaches:
    # its output (and the ranks') is passed through filter_stream instead.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        filter_stream(proc.stdout.fileno(), sys.stdout.buffer, deepspeed_log_level())
    except KeyboardInterrupt:
        pass
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
