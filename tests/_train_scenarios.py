"""Scenarios of fastdit/train.py on one CPU rank, run in one process (tests/test_training_checkpoint.py).

    python tests/_train_scenarios.py WORKDIR [NAME ...]     # writes WORKDIR/results.json

Each scenario calls train.py's main() in this process (an exit is caught; stdout/stderr are captured),
so one interpreter start and one process group serve a dozen runs. A genuine run writes checkpoints at
steps 2 and 4; the scenarios copy it and then plant `__reduce__` objects, damage files, change the batch,
resume into another run's folder, or make the sample grid fail. Every scenario records
{rc, out, err, markers (the planted objects' marker files that exist), files (listed after)}.
"""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "fastdit", "train.py")
STEP2, STEP4 = "step_0000002", "step_0000004"
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
EMA = "ema.pt"
TRAINER = "trainer_state_rank00000.pt"
PLANTED_FILES = (MODEL_STATES, OPTIM, EMA, TRAINER)


class Plant:
    """Unpickling this creates the folder `marker` (os.makedirs): the code a hostile checkpoint runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker, 0o777, True))


def plant(path, marker):
    """Add a Plant to the pickled dict in `path` (a genuine checkpoint file, rewritten in place)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj["planted"] = Plant(marker)
    torch.save(obj, path)


def truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def base_config(out_dir, **train):
    with open(os.path.join(ROOT, "configs", "digits.json")) as f:
        cfg = json.load(f)
    cfg["model"].update(depth=2, hidden_size=64, num_heads=2, patch_size=2, kernels="torch")
    cfg["data"].update(image_size=8, num_workers=0)
    cfg["diffusion"].update(sample_steps="ddim3")
    cfg["train"].update(dict(output_dir=str(out_dir), max_steps=4, log_every=1, ckpt_every=2, keep_last=5,
                             final_sample=False, sample_every=0, samples_per_class=1, plots=False,
                             tensorboard=False, progress=False, cpu_threads=1, final_eval=False), **train)
    cfg["deepspeed"].update(train_batch_size=16, train_micro_batch_size_per_gpu=16,
                            zero_optimization={"stage": 2}, bf16={"enabled": False})
    return cfg


class Driver:
    def __init__(self, work):
        self.work = work
        self.results = {}
        spec = importlib.util.spec_from_file_location("fastdit_train_script", TRAIN)
        self.train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.train)

    def path(self, *parts):
        return os.path.join(self.work, *parts)

    def config(self, name, out_dir, **train):
        path = self.path(f"{name}.json")
        with open(path, "w") as f:
            json.dump(base_config(out_dir, **train), f)
        return path

    def run(self, name, args, markers=(), listing=()):
        out, err = io.StringIO(), io.StringIO()
        rc = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = self.train.main(args)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 - a traceback is a result too (rc 1, as the CLI)
                traceback.print_exc()
                rc = 1
        files = {d: sorted(os.listdir(d)) if os.path.isdir(d) else None for d in listing}
        self.results[name] = dict(rc=rc, out=out.getvalue(), err=err.getvalue(),
                                  markers=[m for m in markers if os.path.exists(m)], files=files)
        return self.results[name]

    def copy_run(self, name):
        dst = self.path(name)
        shutil.copytree(self.path("genuine"), dst)
        return dst

    # ------------------------------------------------------------------------------------------
    def genuine(self):
        """Steps 1-4 from scratch; checkpoints at 2 and 4."""
        cfg = self.config("genuine", self.path("genuine"))
        self.run("genuine", ["--config", cfg], listing=[self.path("genuine", "checkpoints")])

    def genuine3(self):
        """A ZeRO-3 run (its optimizer partitions pickle other DeepSpeed classes than ZeRO-1/2's)."""
        cfg = base_config(self.path("genuine3"), max_steps=2)
        cfg["deepspeed"]["zero_optimization"] = {"stage": 3}
        path = self.path("genuine3.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.run("genuine3", ["--config", path], listing=[self.path("genuine3", "checkpoints", STEP2)])

    def planted(self):
        """A __reduce__ object in each file of step 4: --resume auto and --resume PATH refuse it, nothing
        runs; --trust-checkpoint does run it (the test's marker works)."""
        for f in PLANTED_FILES:
            d = self.copy_run(f"planted-{f}")
            marker = self.path(f"MARKER-{f}")
            plant(os.path.join(d, "checkpoints", STEP4, f), marker)
            cfg = self.config(f"planted-{f}", d, max_steps=6)
            self.run(f"planted-auto-{f}", ["--config", cfg, "--resume", "auto"], [marker],
                     [os.path.join(d, "checkpoints")])
            other = self.config(f"planted-path-{f}", self.path(f"planted-path-out-{f}"), max_steps=6)
            self.run(f"planted-path-{f}", ["--config", other, "--resume", os.path.join(d, "checkpoints", STEP4)],
                     [marker])
        d = self.copy_run("trusted")
        marker = self.path("MARKER-trusted")
        plant(os.path.join(d, "checkpoints", STEP4, MODEL_STATES), marker)
        cfg = self.config("trusted", d, max_steps=5)
        self.run("trusted", ["--config", cfg, "--resume", "auto", "--trust-checkpoint"], [marker])

    def batch(self):
        """Resuming with another global batch is refused."""
        d = self.copy_run("batch")
        cfg = base_config(d, max_steps=6)
        cfg["deepspeed"].update(train_batch_size=32, train_micro_batch_size_per_gpu=32)
        path = self.path("batch.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.run("batch", ["--config", path, "--resume", "auto"])

    def damaged(self):
        """Damaged files of step 4: --resume PATH names the file and the intact step 2; --resume auto sets
        step 4 aside and continues from step 2 with a warning."""
        damage = {"model": (MODEL_STATES, truncate), "optim": (OPTIM, truncate), "ema": (EMA, truncate),
                  "meta": ("meta.json", truncate), "trainer": (TRAINER, os.remove)}
        for name, (f, how) in damage.items():
            d = self.copy_run(f"damaged-{name}")
            how(os.path.join(d, "checkpoints", STEP4, f))
            other = self.config(f"damaged-path-{name}", self.path(f"damaged-path-out-{name}"), max_steps=6)
            self.run(f"damaged-path-{name}", ["--config", other, "--resume", os.path.join(d, "checkpoints", STEP4)])
        for name in ("ema", "trainer"):
            d = self.path(f"damaged-{name}")
            cfg = self.config(f"damaged-auto-{name}", d, max_steps=5)
            self.run(f"damaged-auto-{name}", ["--config", cfg, "--resume", "auto"],
                     listing=[os.path.join(d, "checkpoints")])
        d = self.copy_run("damaged-nometa")  # meta.json deleted (`latest` still names step 4)
        os.remove(os.path.join(d, "checkpoints", STEP4, "meta.json"))
        cfg = self.config("damaged-nometa", d, max_steps=5)
        self.run("damaged-auto-nometa", ["--config", cfg, "--resume", "auto"], listing=[os.path.join(d, "checkpoints")])

    def other_run(self):
        """--resume PATH of one run into an output_dir holding another: refused; --replace-run moves the
        run there aside first; a rewind of the run's own checkpoints is refused too."""
        d = self.copy_run("other")
        src = os.path.join(self.path("genuine"), "checkpoints", STEP4)
        cfg = self.config("other", d, max_steps=6)
        self.run("other-refused", ["--config", cfg, "--resume", src], listing=[os.path.join(d, "checkpoints")])
        self.run("other-rewind", ["--config", cfg, "--resume", os.path.join(d, "checkpoints", STEP2)])
        self.run("other-replaced", ["--config", cfg, "--resume", src, "--replace-run"],
                 listing=[d, os.path.join(d, "checkpoints"), os.path.join(d, "replaced-1", "checkpoints")])

    def sampling(self):
        """The sample grid fails at steps 2 and 4 (the final one): the run finishes all the same."""
        import fastdit.diffusion as diffusion_module

        real = diffusion_module.create_diffusion

        def broken(timestep_respacing, *args, **kwargs):
            if timestep_respacing == "ddim3":  # the grids' respacing (training uses the full chain)
                raise RuntimeError("the sampler broke")
            return real(timestep_respacing, *args, **kwargs)

        diffusion_module.create_diffusion = broken
        try:
            cfg = self.config("sampling", self.path("sampling"), sample_every=2, final_sample=True)
            self.run("sampling", ["--config", cfg], listing=[self.path("sampling", "checkpoints")])
        finally:
            diffusion_module.create_diffusion = real


def main():
    work = sys.argv[1]
    names = sys.argv[2:] or ["genuine", "genuine3", "planted", "batch", "damaged", "other_run", "sampling"]
    os.makedirs(work, exist_ok=True)
    driver = Driver(work)
    for name in names:
        if name != "genuine" and not os.path.isdir(driver.path("genuine")):
            driver.genuine()
        getattr(driver, name)()
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(driver.results, f, indent=1)


if __name__ == "__main__":
    main()
