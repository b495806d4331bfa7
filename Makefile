PY ?= python3

.PHONY: install test digits experiments gpu-check

# Installs fastdit and its test tools. A machine without torch gets the 2.13.0 build first, so that
# pip does not resolve torch itself while installing the dependencies.
install:
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'

# The suite runs on TEST_JOBS pytest-xdist workers (default 2, the CI machine's cores; TEST_JOBS=1 runs it in one
# process). --dist loadfile keeps each test file on one worker, so a module's shared fixture (the throughput smoke
# run, the exported runs) is built once. Measured on a 2-core machine, DeepSpeed's CPU ops not yet built (their first
# use compiles them, ~75 s): 850 s in one process, 560 s on 2 workers (peak 5.9 GB in use).
TEST_JOBS ?= 2

test: install
	$(PY) -m pytest -q $(if $(filter-out 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile) tests

# The main job: a small DiT on scikit-learn's bundled 8x8 digits (upsampled to 16x16, pixel space),
# trained through the same DeepSpeed train.py as ImageNet, on 2 ranks (CPU ranks over gloo without a GPU).
# Writes runs/digits/samples/step_0001000.png (one row per class) and runs/digits/loss_curve.png, and ends
# with the quality line (fastdit/evaluate/digits_quality.py: class-conditional accuracy and digits FD of 50 EMA
# samples per class at CFG 1 and 2, real-vs-real FD, the classifier's test accuracy), saved in
# runs/digits/samples/step_0001000_quality.json and metrics.jsonl.
# The rendezvous port is one the OS says is free (fastdit/training/launch.py), so a job already on 29500
# does not stop it. ARGS go to train.py: make digits ARGS="--set train.max_steps=200".
digits: install
	$(PY) -m fastdit.training.launch --num_gpus 2 --config configs/digits.json --resume auto $(ARGS)

# The paper's conditioning-block and scaling studies in miniature on the digits (docs/experiments.md), each
# <= 15 minutes on 2 CPU cores (BUDGET=medium: about an hour each); resumable, figures in runs/experiments/.
experiments: install
	$(PY) -m fastdit.experiments blocks --budget $(or $(BUDGET),small)
	$(PY) -m fastdit.experiments scaling --budget $(or $(BUDGET),small)

# A GPU at hand for a few minutes: run this first (<= 8 minutes on one H100; no network needed). GPU tests,
# full-size parity, every throughput row, kernel bandwidth and a real DeepSpeed run, each time-boxed under one
# deadline; results in benchmarks/results/<gpu>-<date>-<commit>/. Needs torch + triton; deepspeed and the
# packages it imports come from the environment or from a folder of wheels (WHEELS=DIR, default ./wheels;
# how to build it: docs/performance.md, "GPU check"). `make gpu-check ARGS=--smoke` rehearses it on CPU.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(ARGS)
