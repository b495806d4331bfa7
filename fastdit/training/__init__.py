"""Training a DiT with DeepSpeed: everything fastdit/train.py runs.

    config.py        the JSON config: sections, defaults, --set overrides, checks
    data.py          datasets (latents, images, synthetic, digits) and the deterministic batch order
    trainer.py       the DeepSpeed engine built from a config, and one training step on it
    ema.py           the fp32 EMA, sharded like DeepSpeed's master weights
    checkpoint.py    writing and resuming training checkpoints (layout: fastdit.weights.layout)
    zero_checks.py   ZeRO-1/2 gradient checks in multi-tensor passes (train.fused_grad_checks)
    zero_step.py     the fused ZeRO-1/2 optimizer step (train.fused_optimizer_step)
    graphed.py       the model's forward and backward replayed from CUDA graphs (train.cuda_graph)
    step_profile.py  where a step spends its time (train.profile_steps, benchmarks/step_profile.py)
    metrics.py       metrics.jsonl and the loss curve
"""
