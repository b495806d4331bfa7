"""fastdit/train.py: its checks before any work, and whole runs on 2 CPU ranks through the DeepSpeed
launcher (gloo).

A tiny DiT on the 8x8 digits, fp32 so that resumed and uninterrupted runs can be compared bit for bit.
"""
import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastdit.dist import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "fastdit", "train.py")


def _digits():
    with open(os.path.join(ROOT, "configs", "digits.json")) as f:
        return json.load(f)


def _write(tmp_path, obj, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


# ----------------------------------------------------------------------------------------------
# Before any work: bad configs and missing inputs are refused with what to pass
# ----------------------------------------------------------------------------------------------
def _run_train(args, timeout=120):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, TRAIN] + args, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    return proc, time.time() - t0


def test_train_script_rejects_bad_config_before_any_work(tmp_path):
    raw = _digits()
    raw["train"]["output_dir"] = str(tmp_path / "out")
    raw["model"]["depht"] = 3
    path = _write(tmp_path, raw)
    proc, _ = _run_train(["--config", path])
    assert proc.returncode == 2, proc.stderr
    assert "model.depht" in proc.stderr and path in proc.stderr and "depth" in proc.stderr
    assert not os.path.exists(tmp_path / "out")  # nothing was created
    proc, _ = _run_train(["--config", _write(tmp_path, _digits(), "ok.json"), "--set", "train.seed=x"])
    assert proc.returncode == 2 and "train.seed" in proc.stderr


def test_train_script_missing_inputs_fail_with_what_to_pass(tmp_path):
    raw = _digits()
    raw["train"]["output_dir"] = str(tmp_path / "out")
    raw["data"] = {"kind": "latents", "path": str(tmp_path / "no-latents"), "image_size": 256}
    proc, _ = _run_train(["--config", _write(tmp_path, raw)])
    assert proc.returncode == 2
    assert "extract_latents" in proc.stderr and "data.path" in proc.stderr
    raw["data"] = {"kind": "imagefolder", "path": str(tmp_path), "image_size": 256,
                   "vae": str(tmp_path / "no-vae")}
    (tmp_path / "cls").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "a.png")
    proc, _ = _run_train(["--config", _write(tmp_path, raw, "img.json")])
    assert proc.returncode == 2
    assert "no-vae" in proc.stderr and "data.vae" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


def test_train_script_refuses_to_overwrite_a_run(tmp_path):
    raw = _digits()
    raw["train"]["output_dir"] = str(tmp_path / "out")
    tag = tmp_path / "out" / "checkpoints" / "step_0000005"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text("{}")
    (tag / "ema.pt").write_bytes(b"")
    proc, _ = _run_train(["--config", _write(tmp_path, raw)])
    assert proc.returncode == 2
    assert "step_0000005" in proc.stderr and "--resume auto" in proc.stderr


_TRAIN_MODULE = []


def train_main(argv):
    """fastdit/train.py's main() in this process (the checks below all stop before distributed init)."""
    if not _TRAIN_MODULE:
        import importlib.util

        spec = importlib.util.spec_from_file_location("fastdit_train_script", TRAIN)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TRAIN_MODULE.append(module)
    return _TRAIN_MODULE[0].main(argv)


@pytest.mark.parametrize("override,words", [
    ("deepspeed.zero_optimization.stage=4", "deepspeed.zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", "train_micro_batch_size_per_gpu must be a positive integer"),
    ("deepspeed.train_batch_size=63", "train_batch_size=63 is not a multiple of train_micro_batch_size_per_gpu"),
    ("deepspeed.gradient_accumulation_steps=3", "must equal train_micro_batch_size_per_gpu (32) x "
                                                "gradient_accumulation_steps (3) x ranks (1) = 96"),
    ('deepspeed.zero_optimisation={"stage": 3}', "DeepSpeed does not know deepspeed.zero_optimisation (did you "
                                                 "mean 'zero_optimization'?)"),
    ("deepspeed.bf16.enabeld=true", "deepspeed.bf16.enabeld: unknown key"),
    ("deepspeed.optimizer.params.lr=-0.001", "deepspeed.optimizer.params.lr must be >= 0"),
    ("deepspeed.scheduler.params.warmup_max_lr=-0.001", "deepspeed.scheduler.params.warmup_max_lr must be >= 0"),
    ("model.patch_size=3", "model: input_size 16 is not divisible by patch_size 3"),
    ("model.num_heads=3", "hidden_size 128 is not divisible by num_heads 3"),
    ("train.sample_classes=[0,12]", "train.sample_classes [12] are outside [0, 10)"),
    ("train.eval_every=-5", "train.eval_every must be >= 0 (0 = only at the end), got -5"),
    ("train.eval_samples_per_class=1", "train.eval_samples_per_class=1 is too small to evaluate"),
    ("train.eval_sample_steps=ddim0", "train.eval_sample_steps='ddim0'"),
])
def test_bad_settings_stop_before_any_work_with_one_line(tmp_path, capsys, override, words):
    """DeepSpeed's and the model's own checks, and the settings first used by the sample grids, are checked
    before distributed init: exit 2 and one line (they used to be tracebacks, exit 1, or hours later)."""
    raw = _digits()
    raw["train"]["output_dir"] = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _write(tmp_path, raw), "--set", override])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("fastdit.train: error: "), err
    assert words in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_unwritable_output_dir_and_image_folder_classes_are_checked(tmp_path, capsys):
    raw = _digits()
    (tmp_path / "a-file").write_text("x")
    raw["train"]["output_dir"] = str(tmp_path / "a-file" / "out")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _write(tmp_path, raw)])
    assert e.value.code == 2 and "is not writable" in capsys.readouterr().err
    from PIL import Image
    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "a" / "x.png")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    raw["train"]["output_dir"] = str(tmp_path / "out")
    raw["data"] = {"kind": "imagefolder", "path": str(images), "image_size": 16, "vae": str(tmp_path / "vae")}
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _write(tmp_path, raw)])
    assert e.value.code == 2 and "class folder(s) b hold no images" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(images / "b" / "y.png")
    with pytest.raises(SystemExit) as e:
        train_main(["--config", _write(tmp_path, raw)])
    assert e.value.code == 2 and ("has 2 class folders but data.num_classes is 1000; pass --set "
                                  "data.num_classes=2") in capsys.readouterr().err


def test_deepspeed_errors_exit_2_from_the_command_line(tmp_path):
    raw = _digits()
    raw["train"]["output_dir"] = str(tmp_path / "out")
    proc, _ = _run_train(["--config", _write(tmp_path, raw), "--set", "deepspeed.zero_optimization.stage=4"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error" in line] == [
        f"fastdit.train: error: {tmp_path / 'cfg.json'}: deepspeed.zero_optimization.stage: Input should be "
        f"0, 1, 2, 3 or 3 (got 4)"]


# ----------------------------------------------------------------------------------------------
# Whole runs on 2 CPU ranks
# ----------------------------------------------------------------------------------------------
def tiny_config(out_dir, stage, **train):
    cfg = _digits()
    cfg["model"].update(depth=2, hidden_size=64, num_heads=2, patch_size=2, impl="auto", kernels="torch")
    cfg["data"].update(image_size=8, num_workers=0)
    cfg["diffusion"].update(sample_steps="ddim5", cfg_scale=1.5)
    cfg["train"].update(dict(output_dir=str(out_dir), max_steps=16, log_every=1, ckpt_every=2, keep_last=3,
                             ema_decay=0.9, final_sample=False, plots=False, tensorboard=False,
                             progress=False, cpu_threads=1, max_nonfinite_in_a_row=3), **train)
    ds = cfg["deepspeed"]
    ds.update(train_batch_size=32, train_micro_batch_size_per_gpu=16)
    ds["optimizer"]["params"]["lr"] = 2e-3
    ds["scheduler"]["params"].update(warmup_max_lr=2e-3, warmup_num_steps=4)
    ds["zero_optimization"] = {"stage": stage}
    return cfg


def launch(cfg, tmp_path, name, extra_env=None, extra_args=(), timeout=300):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "FASTDIT_TEST_KILL_DURING_SAVE", "FASTDIT_TEST_NAN_STEPS"):
        env.pop(k, None)
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", str(free_port()), TRAIN, "--config", str(path), *extra_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def ckpt_dir(out_dir, step):
    return os.path.join(out_dir, "checkpoints", f"step_{step:07d}")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where=""):
    """Recursive exact equality of checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's loss scaler object
        assert type(a) is type(b), where
        assert_same(vars(a), vars(b), f"{where}<{type(a).__name__}>")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def raw_weights(out_dir, step):
    from fastdit.weights.export import export_state_dict

    sd, meta, _ = export_state_dict(ckpt_dir(out_dir, step), raw=True)
    return sd


def check_ema_recurrence(out_dir, step, decay):
    """ema_k = decay * ema_{k-1} + (1 - decay) * w_k, from the files of two consecutive checkpoints."""
    prev = torch.load(os.path.join(ckpt_dir(out_dir, step - 1), "ema.pt"), weights_only=True)
    cur = torch.load(os.path.join(ckpt_dir(out_dir, step), "ema.pt"), weights_only=True)
    w = raw_weights(out_dir, step)
    assert set(cur) == set(w)
    moved = 0
    for k in cur:
        expect = decay * prev[k].double() + (1 - decay) * w[k].double()
        torch.testing.assert_close(cur[k].double(), expect, rtol=1e-6, atol=1e-7, msg=k)
        moved += int(not torch.equal(prev[k], cur[k]))
    assert moved > len(cur) // 2  # the average really moves


def falling(records, k=4):
    losses = [r["loss"] for r in records if "loss" in r]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def fast_step(cfg):
    """The optimizer-step switches of the GPU configs: torch's fused AdamW, multi-tensor ZeRO checks,
    one-pass EMA."""
    cfg["deepspeed"]["optimizer"]["params"]["fused"] = True
    cfg["train"].update(fused_grad_checks=True, ema_one_pass=True)
    return cfg


def fused_step(cfg):
    """bf16 training with train.fused_optimizer_step (AdamW, bf16 copy and EMA in one pass) on top, and the
    model's folds: every bias gradient from a fused pass (mlp="fold", bias_fold with sdpa_packed)."""
    cfg = fast_step(cfg)
    cfg["deepspeed"]["bf16"] = {"enabled": True}
    cfg["deepspeed"]["gradient_clipping"] = 0.0       # as the paper's recipe (the fused step refuses clipping)
    cfg["train"]["fused_optimizer_step"] = True
    cfg["model"].update(mlp="fold", bias_fold=True, attention="sdpa_packed")
    return cfg


def fused_deferred_step(cfg):
    """fused_step with the update queued before the host reads the non-finite check
    (train.fused_step_deferred_check)."""
    cfg = fused_step(cfg)
    cfg["train"]["fused_step_deferred_check"] = True
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("fast", [None, fast_step, fused_step, fused_deferred_step],
                         ids=["deepspeed-checks", "fast-step", "fused-step", "fused-deferred-check"])
def test_zero2_exact_resume_after_sigkill_during_save(tmp_path, fast):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    cfg = tiny_config(full_dir, stage=2, ckpt_every=1, keep_last=3)
    if fast:
        cfg = fast(cfg)
    proc = launch(cfg, tmp_path, "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if fast in (fused_step, fused_deferred_step):
        assert "train.fused_optimizer_step: AdamW, the bf16 parameter copy and the EMA in one pass" in \
            proc.stdout + proc.stderr
        assert ("the update queued before the host reads the non-finite check" in proc.stdout + proc.stderr) \
            == (fast is fused_deferred_step)
    first, last = falling(metrics(full_dir))
    assert last < first - 0.02, (first, last)
    check_ema_recurrence(full_dir, 16, 0.9)           # under bf16: against the fp32 masters

    # Same run, SIGKILLed in the middle of saving step 8: step 7 stays the last good checkpoint.
    cut = copy.deepcopy(cfg)
    cut["train"]["output_dir"] = str(cut_dir)
    proc = launch(cut, tmp_path, "cut", extra_env={"FASTDIT_TEST_KILL_DURING_SAVE": "8"})
    assert proc.returncode != 0
    assert "SIGKILL during the save of step 8" in proc.stdout
    ck = os.path.join(cut_dir, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_0000007"
    assert not os.path.exists(ckpt_dir(cut_dir, 8))
    assert os.path.isdir(os.path.join(ck, ".tmp", "step_0000008"))  # the torn save, never published
    from fastdit.weights.export import export_state_dict
    sd, meta, _ = export_state_dict(str(cut_dir))  # the last good checkpoint loads
    assert meta["step"] == 7 and len(sd) > 0

    proc = launch(cut, tmp_path, "cut", extra_args=["--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_0000007" in proc.stdout
    assert not os.path.exists(os.path.join(ck, ".tmp", "step_0000008"))

    a, b = ckpt_dir(full_dir, 16), ckpt_dir(cut_dir, 16)
    assert_same(torch.load(os.path.join(a, "ema.pt"), weights_only=True),
                torch.load(os.path.join(b, "ema.pt"), weights_only=True), "ema")
    for r in range(2):
        name = ("bf16_" if cfg["deepspeed"].get("bf16", {}).get("enabled") else "") + \
            f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        oa = load(os.path.join(a, name))["optimizer_state_dict"]
        ob = load(os.path.join(b, name))["optimizer_state_dict"]
        assert_same(oa, ob, f"optimizer rank {r}")  # fp32 master weights, exp_avg, exp_avg_sq, step
        ta = load(os.path.join(a, f"trainer_state_rank{r:05d}.pt"))
        tb = load(os.path.join(b, f"trainer_state_rank{r:05d}.pt"))
        assert_same(ta, tb, f"trainer state rank {r}")  # RNG streams and data position
    ma, mb = load(os.path.join(a, "mp_rank_00_model_states.pt")), load(os.path.join(b, "mp_rank_00_model_states.pt"))
    for key in ("module", "lr_scheduler", "global_steps", "global_samples"):
        assert_same(ma[key], mb[key], key)
    assert_same(raw_weights(full_dir, 16), raw_weights(cut_dir, 16), "raw")
    # keep_last=3
    tags = sorted(d for d in os.listdir(ck) if d.startswith("step_"))
    assert tags == ["step_0000014", "step_0000015", "step_0000016"]
    # losses after the resume equal the uninterrupted ones
    la = {r["step"]: r["loss"] for r in metrics(full_dir) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in metrics(cut_dir) if "loss" in r}
    assert all(la[s] == lb[s] for s in range(8, 17))


@pytest.mark.slow
def test_zero3_trains_with_sharded_ema_and_writes_pngs(tmp_path):
    out = tmp_path / "z3"
    cfg = tiny_config(out, stage=3, max_steps=14, ckpt_every=1, keep_last=2, final_sample=True,
                      plots=True, tensorboard=True, samples_per_class=1, sample_classes=[0, 3, 7],
                      profile_steps="3-6", eval_every=7, eval_samples_per_class=2, eval_sample_steps="ddim3")
    # partition every parameter, as XL/2's large ones are (the tiny model's would all stay whole under the
    # default 1e5-element persistence threshold): the fast model reads the blocks' adaLN weights outside
    # their modules' forward, and with the folds on (mlp="fold", bias_fold, sdpa_packed) also the qkv, proj,
    # fc1 and fc2 parameters, which ZeRO-3 must gather as external parameters
    cfg["deepspeed"]["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg["model"].update(mlp="fold", bias_fold=True, attention="sdpa_packed")
    proc = launch(cfg, tmp_path, "z3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, last = falling(metrics(out))
    assert last < first - 0.02, (first, last)
    check_ema_recurrence(out, 14, 0.9)
    meta = json.load(open(os.path.join(ckpt_dir(out, 14), "meta.json")))
    assert meta["zero_stage"] == 3 and meta["step"] == 14 and meta["world_size"] == 2
    assert meta["model"] is None and meta["model_kwargs"]["depth"] == 2  # custom architecture
    assert meta["model_kwargs"]["input_size"] == 8 and meta["model_kwargs"]["in_channels"] == 1
    assert meta["vae"] is None and meta["latent_scale"] is None and meta["image_size"] == 8
    grid = os.path.join(out, "samples", "step_0000014.png")
    from PIL import Image
    assert Image.open(grid).size[1] > 3 * 64  # three class rows
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    assert os.listdir(os.path.join(out, "tb"))
    assert f"samples (one row per class): {grid}" in proc.stdout
    # the quality of the sharded EMA, along the way (step 7) and at the end (the quality line and its JSON)
    assert "step 7: quality (EMA, 20 samples, ddim3, seed 0): CFG 1: accuracy" in proc.stdout
    assert "quality (EMA, 20 samples, ddim3, seed 0): CFG 1: accuracy" in proc.stdout.split("done: step 14")[1]
    q = [(r["step"], r["cfg_scale"]) for r in metrics(out) if r.get("quality") == "digits"]
    assert q == [(7, 1.0), (7, 1.5), (14, 1.0), (14, 1.5)]
    assert os.path.isfile(os.path.join(out, "samples", "step_0000014_quality.json"))
    # train.profile_steps=3-6 on rank 0: step 3 timed whole, 4-5 by phase, 6 traced
    prof = json.load(open(os.path.join(out, "profile", "profile.json")))
    assert prof["step"]["steps"] == [3] and prof["phases"]["steps"] == [4, 5]
    assert prof["trace"]["trace_steps"] == [6] and prof["trace"]["step_ms"] == prof["step"]["median_ms"]
    assert list(prof["phases"]["median_ms"]) == ["data", "forward", "backward", "optimizer", "ema"]
    assert all(v > 0 for v in prof["phases"]["median_ms"].values())
    assert prof["trace"]["by_category_ms"]["gemm"] > 0 and prof["missing_steps"] == []
    assert (prof["run"]["zero_stage"], prof["run"]["world_size"], prof["images_per_step"]) == (3, 2, 32)
    assert os.path.isfile(os.path.join(out, "profile", "trace.json"))
    assert "phases, ms per step" in proc.stdout
    # the EMA of a ZeRO-3 run exports and loads into the official-layout model strictly
    from fastdit.models.build import build_dit
    from fastdit.weights import layout
    from fastdit.weights.export import main as export_main
    assert export_main([str(out), "--out", str(tmp_path / "ema.pt")]) == 0
    model = build_dit("reference", **layout.model_kwargs(meta))
    model.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))


# 2: DeepSpeed's ZeRO skip (its per-tensor checks, or fastdit.training.zero_checks' multi-tensor ones with the fast
# step); 0: fastdit's own check (torch AdamW)
@pytest.mark.slow
@pytest.mark.parametrize("stage,fast", [(2, False), (2, True), (0, False)], ids=["zero2", "zero2-fast-step", "zero0"])
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, stage, fast):
    out = tmp_path / "nan"
    cfg = tiny_config(out, stage=stage, max_steps=20, ckpt_every=5, keep_last=5)
    if fast:
        cfg = fast_step(cfg)
    proc = launch(cfg, tmp_path, "nan", extra_env={"FASTDIT_TEST_NAN_STEPS": "3,6,7,8"})
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "step 3: non-finite loss or gradient, step skipped (1 in a row, 1 in total)" in text
    assert "stopped: 3 non-finite steps in a row (steps 6-8" in text
    recs = metrics(out)
    assert [r["step"] for r in recs if r.get("skipped")] == [3, 6, 7, 8]
    meta = json.load(open(os.path.join(ckpt_dir(out, 8), "meta.json")))
    assert meta["stopped"].startswith("3 non-finite steps in a row")
    state = load(os.path.join(ckpt_dir(out, 8), "trainer_state_rank00000.pt"))
    assert state["nonfinite_total"] == 4 and state["nonfinite_in_a_row"] == 3
    # skipped steps leave weights, optimizer and EMA untouched: step 8 == step 5 (steps 6, 7, 8 skipped)
    assert_same(raw_weights(out, 5), raw_weights(out, 8), "weights")
    if stage == 0:
        o5 = load(os.path.join(ckpt_dir(out, 5), "mp_rank_00_model_states.pt"))["optimizer"]
        o8 = load(os.path.join(ckpt_dir(out, 8), "mp_rank_00_model_states.pt"))["optimizer"]
        assert_same(o5["state"], o8["state"], "adam state")
    assert_same(torch.load(os.path.join(ckpt_dir(out, 5), "ema.pt"), weights_only=True),
                torch.load(os.path.join(ckpt_dir(out, 8), "ema.pt"), weights_only=True), "ema")
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged if r["loss"] is None] == [3, 6, 7]  # nothing applied to average (8 stops)
    assert all(r["loss"] > 0 for r in logged if r["loss"] is not None)  # logged losses stay finite


@pytest.mark.slow
def test_train_prints_quality_and_survives_a_failed_evaluation(tmp_path):
    """2 CPU ranks: quality every 2 steps (step 2's evaluation fails on rank 1: logged, training goes on),
    the final quality line, metrics.jsonl records, the JSON beside the grid; the same numbers from the
    checkpoint in one process (the samples do not depend on the ranks)."""
    from fastdit.evaluate import digits_quality as dq
    from fastdit.generate.sample import load_model

    out = tmp_path / "run"
    cfg = tiny_config(out, stage=2, max_steps=4, ckpt_every=4, final_sample=True, samples_per_class=1,
                      eval_every=2, eval_samples_per_class=2, eval_sample_steps="ddim3", eval_batch_size=7)
    cfg["model"].update(depth=1, hidden_size=32)
    cfg["diffusion"].update(cfg_scale=2.0)
    proc = launch(cfg, tmp_path, "quality", extra_env={"FASTDIT_TEST_QUALITY_FAIL_STEPS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2: quality evaluation failed (rank 1: RuntimeError" in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and not ln.startswith("[")]  # not the launcher's
    line = next(ln for ln in lines if ln.startswith("quality (EMA"))
    assert line.startswith("quality (EMA, 20 samples, ddim3, seed 0): CFG 1: accuracy") and "CFG 2: accuracy" in line
    assert "real-vs-real FD" in line and "classifier test accuracy 97.7%" in line
    recs = metrics(out)
    assert [r["step"] for r in recs if "quality_error" in r] == [2]
    q = [r for r in recs if r.get("quality") == "digits"]
    assert [(r["step"], r["cfg_scale"]) for r in q] == [(4, 1.0), (4, 2.0)]
    saved = json.load(open(out / "samples" / "step_0000004_quality.json"))
    assert saved["records"][0]["fd"] == q[0]["fd"] and saved["classifier"]["num_test"] == 1258
    assert saved["digits_split"] == "dit" and os.path.isfile(out / "samples" / "step_0000004.png")
    model, _ = load_model(str(out), impl="reference")
    again = dq.evaluate_model(model, dq.DigitsJudge.load(), 2, [1.0, 2.0], "ddim3", seed=0, batch_size=7,
                              guide_all_channels=True)
    for a, b in zip(again, q):
        assert a["accuracy"] == b["accuracy"] and a["fd"] == pytest.approx(b["fd"], rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    cfg = tiny_config(full_dir, stage=2, max_steps=8, ckpt_every=100, keep_last=3, tensorboard=True)
    proc = launch(cfg, tmp_path, "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    cut = copy.deepcopy(cfg)
    cut["train"]["output_dir"] = str(cut_dir)
    # SIGTERM reaches one rank only (the last) after step 3: both stop after step 3, with a checkpoint
    proc = launch(cut, tmp_path, "cut", extra_env={"FASTDIT_TEST_SIGTERM_AFTER_STEP": "3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 3" in proc.stdout
    assert "checkpoint saved: " in proc.stdout and "(step 3)" in proc.stdout
    ck = os.path.join(cut_dir, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_0000003"
    assert [r["step"] for r in metrics(cut_dir)] == [1, 2, 3]

    proc = launch(cut, tmp_path, "cut", extra_args=["--resume", "auto"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = ckpt_dir(full_dir, 8), ckpt_dir(cut_dir, 8)
    assert_same(torch.load(os.path.join(a, "ema.pt"), weights_only=True),
                torch.load(os.path.join(b, "ema.pt"), weights_only=True), "ema")
    assert_same(raw_weights(full_dir, 8), raw_weights(cut_dir, 8), "raw")
    la = {r["step"]: r["loss"] for r in metrics(full_dir)}
    lb = {r["step"]: r["loss"] for r in metrics(cut_dir)}
    assert la == lb and sorted(lb) == list(range(1, 9))


def test_the_script_leaves_the_process_group_after_a_finished_run(tmp_path):
    """fastdit/train.py's entry (run_cli): main(), then the process group destroyed, so the group's threads do
    not die at interpreter exit; main() alone (what in-process callers run) keeps it."""
    out = tmp_path / "run"
    path = _write(tmp_path, tiny_config(out, stage=2, max_steps=2, ckpt_every=2))
    code = (
        "import importlib.util, sys, torch.distributed as d\n"
        f"spec = importlib.util.spec_from_file_location('fastdit_train_script', {TRAIN!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"assert m.main(['--config', {path!r}, '--set', 'train.max_steps=1']) == 0\n"
        "print('after main:', d.is_initialized())\n"
        f"assert m.run_cli(['--config', {path!r}, '--resume', 'auto']) == 0\n"
        "print('after run_cli:', d.is_initialized())\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "after main: True" in proc.stdout and "after run_cli: False" in proc.stdout, proc.stdout[-2000:]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_0000002"))


def test_a_failed_cuda_graph_capture_stops_with_one_line(tmp_path):
    """train.cuda_graph: a capture that fails at the first step (an op that cannot be captured) ends the run with
    one line naming the switch, exit 2, nothing saved (on CPU the graphs are emulated; the capture is made to
    fail the way a non-capturable op fails it)."""
    out = tmp_path / "run"
    path = _write(tmp_path, tiny_config(out, stage=2, max_steps=2, ckpt_every=2))
    code = (
        "import importlib.util, sys\n"
        "from fastdit.training import graphed\n"
        "def broken(self, name, fn):\n"
        "    raise RuntimeError('CUDA error: operation not permitted when stream is capturing')\n"
        "graphed.EmulatedGraphs.capture = broken\n"
        f"spec = importlib.util.spec_from_file_location('fastdit_train_script', {TRAIN!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"sys.exit(m.run_cli(['--config', {path!r}, '--set', 'train.cuda_graph=true']))\n")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    err = [line for line in proc.stderr.splitlines() if line.startswith("fastdit.train: error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train.cuda_graph: graphed forward: capturing the forward and backward failed (RuntimeError: CUDA " \
           "error: operation not permitted when stream is capturing); run without graphs" in err[0], err
    assert "Traceback" not in proc.stderr
    assert not os.path.isdir(os.path.join(out, "checkpoints", "step_0000001"))


def test_rerunning_a_finished_run_says_complete_and_does_nothing(tmp_path, capsys):
    from fastdit.training.completion import completed_message

    out = tmp_path / "done"
    tag = out / "checkpoints" / "step_0000005"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text("{}")
    (tag / "ema.pt").write_bytes(b"")
    (out / "checkpoints" / "latest").write_text("step_0000005")
    rc = train_main(["--config", "digits", "--set", f"train.output_dir={out}", "--set", "train.max_steps=5",
                     "--resume", "auto"])
    assert rc == 0
    said = capsys.readouterr().out
    assert f"{out} is already complete at step 5" in said and "--set train.max_steps=" in said
    assert sorted(os.listdir(out)) == ["checkpoints"]  # no metrics, samples or tb written
    assert completed_message(str(out), 6, "auto") is None  # steps left: trains on
    assert completed_message(str(out), 5, None) is None  # without --resume auto: train.py refuses instead
