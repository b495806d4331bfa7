"""The DiT paper's design-space experiments as commands (Peebles & Xie 2023, §4-5, in miniature).

    python -m fastdit.experiments blocks                  # the four conditioning blocks (Fig. 5)
    python -m fastdit.experiments scaling                 # model size x patch size (Figs. 2, 6, 8, 9)
    python -m fastdit.experiments blocks --budget smoke   # seconds: the suite runs this
    python -m fastdit.experiments plot runs/experiments/blocks-small   # redraw a finished study

Every member of a study is one ordinary training run of fastdit/train.py (its own output folder,
`--resume auto`, launched with `python fastdit/train.py` on one rank or through DeepSpeed's launcher
with `--num-gpus N`), with the quality evaluation of fastdit.training.quality every `eval_every` steps:
on digits the classifier's accuracy and digits FD (fastdit.evaluate.digits_quality), on latent configs FID when
train.eval_fid_ref and train.eval_inception_weights are set. The members run one after the other; a
finished member is never retrained, an interrupted one resumes from its last checkpoint, a failed one
is recorded (with the end of its log) and the others go on. The study writes `results.json` and the
figure (`blocks.png` / `scaling.png`) to its folder. See docs/experiments.md.
"""
from fastdit.experiments.runner import (BLOCK_TYPES, BUDGETS, DIGITS_FAMILY, Member, main,  # noqa: F401
                                        plan_blocks, plan_scaling, run_study)
