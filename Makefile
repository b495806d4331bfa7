PY ?= python3

.PHONY: install test digits

# Installs fastdit and its test tools. A machine without torch gets the 2.13.0 build first, so that
# pip does not resolve torch itself while installing the dependencies.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'

test: install
	$(PY) -m pytest -q tests

# The main job: a small DiT on scikit-learn's bundled 8x8 digits (upsampled to 16x16, pixel space),
# trained through the same DeepSpeed train.py as ImageNet, on 2 ranks (CPU ranks over gloo without a GPU).
# Writes runs/digits/samples/step_0001000.png (one row per class) and runs/digits/loss_curve.png.
digits: install
	$(PY) -m deepspeed.launcher.runner --num_gpus 2 fastdit/train.py --config configs/digits.json --resume auto
