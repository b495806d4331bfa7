"""fastdit.training.trainer.check_deepspeed_config: the deepspeed section against DeepSpeed's own config
model before any work (the whole engine runs in test_train.py)."""
import copy
import os

import pytest

from fastdit.training.config import ConfigError, load_config
from fastdit.training.trainer import check_deepspeed_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".json")))
def test_shipped_configs_pass(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    for world in (1, 2, 8):
        if name == "digits.json" and world == 8:
            with pytest.raises(ConfigError, match="not a multiple of"):  # 64 images over 8 ranks of 32
                check_deepspeed_config(cfg, world)
            continue
        check_deepspeed_config(cfg, world)


@pytest.mark.parametrize("change,message", [
    (lambda ds: ds.update(zero_optimisation={"stage": 3}), "does not know deepspeed.zero_optimisation"),
    (lambda ds: ds.update(trian_batch_size=64), "deepspeed.trian_batch_size \\(did you mean 'train_batch_size'"),
    (lambda ds: ds["zero_optimization"].update(stage=4), "zero_optimization.stage: Input should be"),
    (lambda ds: ds["scheduler"].update(type="WarmLR"), "scheduler.type 'WarmLR' is not a DeepSpeed scheduler"),
    (lambda ds: ds["scheduler"]["params"].update(warmup_maxlr=1e-3), "WarmupLR has no warmup_maxlr"),
    (lambda ds: ds["scheduler"]["params"].update(warmup_num_steps=-5), "warmup_num_steps must be >= 0"),
    (lambda ds: ds.update(train_batch_size=64, train_micro_batch_size_per_gpu=32, gradient_accumulation_steps=2),
     "= 128"),
])
def test_what_deepspeed_would_ignore_or_reject_is_named(change, message):
    cfg = copy.deepcopy(load_config(os.path.join(CONFIGS, "digits.json")))
    change(cfg.deepspeed)
    with pytest.raises(ConfigError, match=message):
        check_deepspeed_config(cfg, 2)
