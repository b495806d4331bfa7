"""Sample quality during and after training: fastdit/train.py's evaluation hook.

Every train.eval_every optimizer steps (0 = never along the way) and once at the end (train.final_eval),
the EMA weights are sampled (fastdit.generate.sample's API: DDIM or DDPM per train.eval_sample_steps, fixed
per-sample seeds from train.eval_seed, else train.seed) and scored:

  * digits runs (data.kind="digits"): fastdit.evaluate.digits_quality's class-conditional accuracy and digits FD of
    train.eval_samples_per_class samples per class, with the real-vs-real FD and the classifier's test
    accuracy beside them;
  * latent runs, when train.eval_fid_ref (an ADM reference batch: images or mu/sigma) and
    train.eval_inception_weights are given: FID of train.eval_num_samples samples (classes i mod K),
    decoded by the run's VAE, against the reference (fastdit.evaluate.fid / fastdit.evaluate.run).

The settings are checked when the config loads (fastdit.training.config: ranges, the sampler, "too small
to evaluate"); check_files() checks the FID files before training starts.

Each score is taken at CFG 1 and/or the configured diffusion.cfg_scale (train.eval_cfg: both, unguided,
guided). The samples are split over the ranks in fixed chunks of train.eval_batch_size (sample j has its
own noise generator, so a chunk's samples do not depend on which rank draws them). Records go to
metrics.jsonl ({"step", "quality", "cfg_scale", ...}), TensorBoard (quality/cfg<scale>/...) and, at the
end, `<output_dir>/samples/<tag>_quality.json`. A failed evaluation (on any rank) is logged as
{"step", "quality_error"} and training goes on.

Test hook: FASTDIT_TEST_QUALITY_FAIL_STEPS (see _test_fail_steps).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from fastdit.training.config import final_eval


def _world_rank():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _test_fail_steps():
    """Test hook: FASTDIT_TEST_QUALITY_FAIL_STEPS="2,4" makes the evaluations of those steps fail on the
    last rank (after the EMA gather, before sampling), to check that training goes on."""
    text = os.environ.get("FASTDIT_TEST_QUALITY_FAIL_STEPS", "")
    return {int(s) for s in text.split(",") if s.strip()}


def check_files(cfg) -> Optional[str]:
    """What is wrong with the files an evaluation reads (a message), or None: run before any heavy work."""
    for k in ("eval_fid_ref", "eval_inception_weights"):
        value = getattr(cfg.train, k)
        if value and cfg.data.kind != "digits" and not os.path.isfile(value):
            return f"{cfg.path}: train.{k}={value!r} does not exist"
    return None


def quality_mode(cfg) -> Optional[str]:
    """"digits", "fid" or None (nothing to score with)."""
    if cfg.data.kind == "digits":
        return "digits"
    if cfg.train.eval_fid_ref and cfg.train.eval_inception_weights:
        return "fid"
    return None


def cfg_scales(cfg, model_kwargs: Dict[str, Any]) -> List[float]:
    """The CFG scales of an evaluation: 1 and/or diffusion.cfg_scale (guided needs a null class)."""
    scale = float(cfg.diffusion.cfg_scale)
    can_guide = model_kwargs.get("class_dropout_prob", 0.1) > 0 and scale != 1.0
    choice = cfg.train.eval_cfg
    out = []
    if choice in ("both", "unguided") or not can_guide:
        out.append(1.0)
    if choice in ("both", "guided") and can_guide:
        out.append(scale)
    return out


class QualityEvaluator:
    """train.py's hook. `evaluate(step)` is a collective (every rank calls it); rank 0 gets the records.

    model_factory() builds a fresh sampling model (the trained architecture, eval mode not required);
    the EMA weights are loaded into it on every rank.
    """

    def __init__(self, cfg, setup, model_factory: Callable[[], torch.nn.Module], *, out_dir: str,
                 vae_spec: Optional[str], metrics_path: str, writer=None, log: Callable[[str], None] = print):
        self.cfg, self.setup, self.model_factory = cfg, setup, model_factory
        self.out_dir, self.vae_spec, self.metrics_path = out_dir, vae_spec, metrics_path
        self.writer, self.log = writer, log
        self.mode = quality_mode(cfg)
        self.final = self.mode is not None and final_eval(cfg)
        self.scales = cfg_scales(cfg, setup.full_kwargs)
        self.seed = cfg.train.eval_seed if cfg.train.eval_seed is not None else cfg.train.seed
        self._judge = None
        self._ref_stats = None
        self.last: Optional[List[Dict[str, Any]]] = None
        world, rank = _world_rank()
        if rank == 0 and self.mode is None and cfg.train.eval_every:
            log("train.eval_every: no quality number for this run: FID needs train.eval_fid_ref (a reference "
                "batch .npz) and train.eval_inception_weights (pt_inception-2015-12-05-6726825d.pth)")

    # ------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return self.mode is not None and bool(every) and step % every == 0

    def _plan(self):
        t = self.cfg.train
        nc = int(self.setup.full_kwargs["num_classes"])
        if self.mode == "digits":
            from fastdit.evaluate.digits_quality import eval_plan
            return eval_plan(t.eval_samples_per_class, min(nc, 10), self.seed)
        n = t.eval_num_samples
        return [j % nc for j in range(n)], [self.seed * 1_000_003 + j for j in range(n)]

    def _my_indices(self, n: int, world: int, rank: int) -> List[int]:
        bs = self.cfg.train.eval_batch_size
        chunks = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
        return [j for k, c in enumerate(chunks) if k % world == rank for j in c]

    @torch.no_grad()
    def evaluate(self, step: int) -> Optional[List[Dict[str, Any]]]:
        """Score the EMA at `step`; rank 0 returns the records ([] after a failure), others None."""
        if self.mode is None:
            return None
        import torch.distributed as dist

        world, rank = _world_rank()
        t0 = time.time()
        sd = self.setup.ema.full_state_dict(dst=None)  # every rank samples its share
        labels, seeds = self._plan()
        mine = self._my_indices(len(labels), world, rank)
        local: Dict[str, Any] = {"indices": mine}
        try:
            if step in _test_fail_steps() and rank == world - 1:
                raise RuntimeError(f"FASTDIT_TEST_QUALITY_FAIL_STEPS: evaluation of step {step} fails")
            cuda = [self.setup.device] if self.setup.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # building the model draws from the training RNG
                local["result"] = self._local_work(sd, labels, seeds, mine)
        except Exception as e:  # noqa: BLE001 - an evaluation never stops training
            local["error"] = f"rank {rank}: {type(e).__name__}: {e}"
            if os.environ.get("FASTDIT_DEBUG"):
                traceback.print_exc()
        del sd
        if world > 1:
            gathered: List[Any] = [None] * world
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        if self.mode == "fid" and not any("error" in g for g in gathered):
            self._reduce_moments(gathered, world)
        if rank != 0:
            return None
        errors = [g["error"] for g in gathered if "error" in g]
        records: List[Dict[str, Any]] = []
        if not errors:
            try:
                records = self._score(gathered, labels, step, time.time() - t0)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
        if errors:
            msg = "; ".join(errors)
            self.log(f"step {step}: quality evaluation failed ({msg}); training goes on")
            self._append({"step": step, "quality_error": msg})
            self.last = []
            return []
        for rec in records:
            self._append(rec)
            if self.writer is not None:
                for k in ("accuracy", "fd", "fd_real", "fid"):
                    if rec.get(k) is not None:
                        self.writer.add_scalar(f"quality/cfg{rec['cfg_scale']:g}/{k}", rec[k], step)
        self.last = records
        return records

    # ------------------------------------------------------------------------------------------
    def _local_work(self, sd, labels, seeds, mine) -> Dict[str, Any]:
        from fastdit.evaluate.digits_quality import sample_chunks
        from fastdit.generate.sample import parse_sample_steps, respacing

        cfg, device = self.cfg, self.setup.device
        model = self.model_factory()
        model.load_state_dict(sd)
        model.to(device).eval()
        from fastdit.diffusion import create_diffusion

        sampler, num_steps = parse_sample_steps(cfg.train.eval_sample_steps)
        diffusion = create_diffusion(respacing(sampler, num_steps), noise_schedule=cfg.diffusion.noise_schedule,
                                     learn_sigma=model.learn_sigma, diffusion_steps=cfg.diffusion.diffusion_steps)
        guide_all = True if cfg.diffusion.guide_all_channels else None
        bs = cfg.train.eval_batch_size
        vae = net = None
        if self.mode == "fid":
            from fastdit.evaluate.inception import load_fid_inception
            from fastdit.generate.vae import load_vae
            vae = load_vae(self.vae_spec, device) if self.vae_spec else None
            net = load_fid_inception(cfg.train.eval_inception_weights, device=device)
        out: Dict[str, Any] = {}
        for scale in self.scales:
            if self.mode == "digits":
                out[scale] = sample_chunks(model, labels, seeds, mine, scale, cfg.train.eval_sample_steps, device,
                                           bs, guide_all, diffusion)
            else:
                out[scale] = fid_moments(model, labels, seeds, mine, scale, cfg.train.eval_sample_steps, device,
                                         bs, guide_all, diffusion, vae, cfg.data.latent_scale, net)
        return out

    def _reduce_moments(self, gathered, world):
        """Sum every rank's feature moments (count, sum, sum of outer products) per scale, in float64."""
        import torch.distributed as dist

        mine = gathered[_world_rank()[1]]["result"]
        total = {}
        for scale, (n, s1, s2) in mine.items():
            t_n = torch.tensor([float(n)], dtype=torch.float64)
            t1, t2 = torch.from_numpy(s1).clone(), torch.from_numpy(s2).clone()
            if world > 1:
                dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
                t_n, t1, t2 = t_n.to(dev), t1.to(dev), t2.to(dev)
                for t in (t_n, t1, t2):
                    dist.all_reduce(t)
            total[scale] = (int(t_n.item()), t1.cpu().numpy(), t2.cpu().numpy())
        gathered[0]["reduced"] = total

    def _score(self, gathered, labels, step: int, seconds: float) -> List[Dict[str, Any]]:
        t = self.cfg.train
        records = []
        if self.mode == "digits":
            judge = self.judge()
            order = [j for g in gathered for j in g["indices"]]
            for scale in self.scales:
                x = torch.cat([g["result"][scale] for g in gathered if len(g["indices"])])
                x = x[torch.as_tensor(np.argsort(order))]
                rec = judge.score(x, labels)
                records.append(dict({"step": step, "quality": "digits", "cfg_scale": scale}, **rec,
                                    samples_per_class=t.eval_samples_per_class, sample_steps=t.eval_sample_steps,
                                    seed=self.seed, eval_seconds=seconds))
            return records
        from fastdit.evaluate.fid import frechet_distance
        mu_ref, sigma_ref = self.reference_stats()
        for scale, (n, s1, s2) in gathered[0]["reduced"].items():
            mu = s1 / n
            sigma = (s2 - n * np.outer(mu, mu)) / (n - 1)
            records.append({"step": step, "quality": "fid", "cfg_scale": scale,
                            "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "num_samples": n,
                            "sample_steps": t.eval_sample_steps, "seed": self.seed, "reference": t.eval_fid_ref,
                            "eval_seconds": seconds})
        return records

    def judge(self):
        if self._judge is None:
            from fastdit.evaluate.digits_quality import DigitsJudge
            self._judge = DigitsJudge.load(self.cfg.train.eval_cache_dir, log=self.log)
        return self._judge

    def reference_stats(self):
        if self._ref_stats is None:
            from fastdit.evaluate.run import _LazyInception, describe_set
            inc = _LazyInception(self.cfg.train.eval_inception_weights, self.setup.device)
            ref = describe_set(self.cfg.train.eval_fid_ref, inc, progress=False)
            self._ref_stats = (ref["mu"], ref["sigma"])
        return self._ref_stats

    def _append(self, rec: Dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------
    def summary(self, records: Optional[List[Dict[str, Any]]]) -> Optional[str]:
        """The console line of a final evaluation."""
        if not records:
            return None
        if self.mode == "digits":
            from fastdit.evaluate.digits_quality import quality_line
            return quality_line(records)
        return "quality: " + " | ".join(f"CFG {r['cfg_scale']:g}: FID-{r['num_samples']} {r['fid']:.2f}"
                                        for r in records)

    def write_json(self, records: List[Dict[str, Any]], path: str) -> str:
        payload = {"records": records, "mode": self.mode, "config": self.cfg.path}
        if self.mode == "digits" and self._judge is not None:
            payload["classifier"] = self._judge.describe()
            payload["digits_split"] = self.cfg.data.digits_split
        from fastdit.atomic import write_json

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, payload)
        return path


def fid_moments(model, labels, seeds, indices, cfg_scale, sample_steps, device, batch_size, guide_all_channels,
                diffusion, vae, latent_scale, net):
    """(count, sum (D,), sum of outer products (D, D)) of Inception pool features of these samples."""
    from fastdit.evaluate.digits_quality import sample_chunks
    from fastdit.evaluate.fid import extract_features
    from fastdit.generate.images import decode_images

    n, s1, s2 = 0, None, None
    for i in range(0, len(indices), batch_size):
        idx = list(indices[i: i + batch_size])
        x0 = sample_chunks(model, labels, seeds, idx, cfg_scale, sample_steps, device, batch_size,
                           guide_all_channels, diffusion)
        images = decode_images(x0.to(device), vae, latent_scale)
        pool = extract_features([images], net, device=device)["pool"]
        s1 = pool.sum(0) if s1 is None else s1 + pool.sum(0)
        s2 = pool.T @ pool if s2 is None else s2 + pool.T @ pool
        n += len(pool)
    if n == 0:
        d = 2048
        return 0, np.zeros(d), np.zeros((d, d))
    return n, s1, s2
