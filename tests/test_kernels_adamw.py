"""fastdit.kernels.adamw: the one-pass AdamW (+ bf16 copy + EMA) against torch.optim.AdamW.

On CPU the Triton kernel runs through the interpreter (tests/conftest.py); on CUDA it is the real kernel.
"""
import pytest
import torch

from fastdit.kernels.adamw import BLOCK, adamw_step_, adamw_step_ref_

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HP = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)


def _torch_adamw(p0, grads, **hp):
    """Masters and moments after torch.optim.AdamW (single-tensor path) on the fp32 upcast of `grads`."""
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], foreach=False)
    for g in grads:
        p.grad = g.float()
        opt.step()
    st = opt.state[p]
    return p.detach(), st["exp_avg"], st["exp_avg_sq"]


def _run(fn, p0, grads, lo, hi, ema_weight=0.1, **hp):
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    lp = torch.empty(p0.numel(), dtype=torch.bfloat16, device=p0.device)
    ema = p0[lo:hi].clone()
    for step, g in enumerate(grads, 1):
        fn(p, g, m, v, step=step, lp=lp, ema=ema, ema_weight=ema_weight, ema_range=(lo, hi), **hp)
    return p, m, v, lp, ema


def test_reference_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    n = 777
    p0 = torch.randn(n, device=DEV)
    grads = [torch.randn(n, device=DEV).bfloat16() for _ in range(5)]
    tp, tm, tv = _torch_adamw(p0, grads, **HP)
    p, m, v, lp, ema = _run(adamw_step_ref_, p0, grads, 0, n, **HP)
    assert torch.equal(p, tp) and torch.equal(m, tm) and torch.equal(v, tv)
    assert torch.equal(lp, p.bfloat16())


@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,lo,hi", [(2 * BLOCK + 37, 5, 2 * BLOCK + 30), (BLOCK, 0, BLOCK), (300, 0, 0)])
def test_kernel_matches_the_reference(monkeypatch, gdtype, n, lo, hi):
    monkeypatch.setenv("FASTDIT_KERNEL_POISON", "1")
    torch.manual_seed(1)
    p0 = torch.randn(n, device=DEV)
    grads = [(torch.randn(n, device=DEV) * 10 ** k).to(gdtype) for k in (-3, 0, 2)]
    want = _run(adamw_step_ref_, p0, grads, lo, hi, **HP)
    got = _run(adamw_step_, p0, grads, lo, hi, **HP)
    for name, a, b in zip(("p", "m", "v", "lp", "ema"), got, want):
        if name == "lp":
            assert torch.equal(a, got[0].bfloat16()), name          # the rounding of the new master
        else:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=name)


def test_kernel_leaves_elements_outside_the_ema_range():
    n = BLOCK + 5
    p0 = torch.randn(n, device=DEV)
    ema = torch.full((10,), 7.0, device=DEV)
    p, m, v = p0.clone(), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    adamw_step_(p, torch.ones(n, device=DEV), m, v, step=1, ema=ema, ema_weight=0.5, ema_range=(BLOCK - 5, BLOCK + 5),
                **HP)
    torch.testing.assert_close(ema, 0.5 * 7.0 + 0.5 * p[BLOCK - 5:BLOCK + 5], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [adamw_step_, adamw_step_ref_])
def test_bad_inputs_raise_before_any_write(fn):
    n = 16
    p, m, v = torch.zeros(n, device=DEV), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    g = torch.ones(n, device=DEV)
    cases = [
        (dict(p=p.double()), TypeError, "float32"),
        (dict(g=g.int()), TypeError, "g must be"),
        (dict(m=torch.zeros(n + 1, device=DEV)), ValueError, "m must be a contiguous 1-D"),
        (dict(v=torch.zeros(2 * n, device=DEV)[::2]), ValueError, "v must be a contiguous 1-D"),
        (dict(step=0), ValueError, "step must be >= 1"),
        (dict(ema=torch.zeros(4, device=DEV), ema_range=(2, 5)), ValueError, "ema must be"),
        (dict(ema=torch.zeros(4, device=DEV), ema_range=(14, 18)), ValueError, "ema_range"),
    ]
    for over, exc, msg in cases:
        args = dict(p=p, g=g, m=m, v=v, step=1)
        args.update(over)
        kw = {k: args.pop(k) for k in list(args) if k not in ("p", "g", "m", "v")}
        with pytest.raises(exc, match=msg):
            fn(args["p"], args["g"], args["m"], args["v"], **{**HP, **kw})
        assert not p.any() and not m.any() and not v.any()


def _segmented(lengths, order, gap=0, dtype=torch.bfloat16, seed=3):
    """A gradient buffer holding p's stretches in another order (as ZeRO-2's hook order), with `gap`
    unused elements before each; returns (buffer, GradSegments, the gradient in p's order)."""
    from fastdit.kernels.adamw import GradSegments
    torch.manual_seed(seed)
    n = sum(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    offsets, pos = [0] * len(lengths), 0
    for i in order:
        pos += gap
        offsets[i] = pos
        pos += lengths[i]
    buf = torch.randn(pos, device=DEV).to(dtype)
    seg = GradSegments(starts, offsets, lengths, buf.numel(), DEV)
    return buf, seg, seg.gather(buf), n


@pytest.mark.parametrize("lengths,order,gap", [
    ([BLOCK + 40, 3, 5, 2 * BLOCK - 8, 17], [4, 3, 2, 1, 0], 0),      # reversed, blocks over 1-3 segments
    ([64, 64, 3 * BLOCK], [2, 0, 1], 8),                              # 8-aligned shifts: 128-bit loads
    ([BLOCK, 1, BLOCK - 1], [1, 2, 0], 3),                            # unaligned shifts
    ([2 * BLOCK + 5], [0], 5),                                        # one segment: a plain view
])
def test_segmented_gradient_equals_the_gathered_one(lengths, order, gap):
    buf, seg, g_ordered, n = _segmented(lengths, order, gap)
    assert seg.aligned == all((o - m) % 8 == 0 for m, o in zip(seg.host[0], seg.host[1]))
    p0 = torch.randn(n, device=DEV)
    want = _run(adamw_step_ref_, p0, [g_ordered] * 2, 0, n, **HP)
    p, m, v = p0.clone(), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    lp = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    ema = p0.clone()
    for step in (1, 2):
        adamw_step_(p, buf, m, v, step=step, lp=lp, ema=ema, ema_weight=0.1, segments=seg, **HP)
    for name, a, b in zip(("p", "m", "v", "ema"), (p, m, v, ema), (want[0], want[1], want[2], want[4])):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7, msg=name)
    # the reference takes the same tables
    q, mq, vq = p0.clone(), torch.zeros(n, device=DEV), torch.zeros(n, device=DEV)
    for step in (1, 2):
        adamw_step_ref_(q, buf, mq, vq, step=step, segments=seg, **HP)
    assert torch.equal(q, want[0])


def test_segment_tables_are_checked():
    from fastdit.kernels.adamw import GradSegments
    with pytest.raises(ValueError, match="tile p in order"):
        GradSegments([0, 5], [0, 10], [4, 4], 20, DEV)            # a hole in p
    with pytest.raises(ValueError, match="inside G"):
        GradSegments([0, 4], [0, 18], [4, 4], 20, DEV)            # past the end of G
    seg = GradSegments([0, 4], [4, 0], [4, 4], 8, DEV)
    with pytest.raises(ValueError, match="cover 8 elements, p has 9"):
        adamw_step_(torch.zeros(9, device=DEV), torch.zeros(8, device=DEV), torch.zeros(9, device=DEV),
                    torch.zeros(9, device=DEV), step=1, segments=seg, **HP)


@pytest.mark.parametrize("fn", [adamw_step_, adamw_step_ref_])
@pytest.mark.parametrize("segmented", [False, True])
def test_gate_finite_updates_as_without_it_and_not_finite_writes_nothing(fn, segmented):
    """gate (train.fused_step_deferred_check): a finite gate gives the ungated update bit for bit; an inf or NaN
    gate leaves p, m, v, the low-precision copy and the EMA as they were (the kernel reads it on the device)."""
    if segmented:
        g, seg, _, n = _segmented([BLOCK + 40, 3, 2 * BLOCK - 8], [2, 0, 1], gap=8)
    else:
        n, seg = 2 * BLOCK + 37, None
        g = torch.randn(n, device=DEV).bfloat16()
    torch.manual_seed(5)
    p0, m0, v0 = torch.randn(n, device=DEV), torch.randn(n, device=DEV), torch.rand(n, device=DEV)

    def state():
        return (p0.clone(), m0.clone(), v0.clone(), torch.full((n,), 3.0, dtype=torch.bfloat16, device=DEV),
                torch.full((n - 7,), 5.0, device=DEV))

    def step(st, gate):
        p, m, v, lp, ema = st
        fn(p, g, m, v, step=3, lp=lp, ema=ema, ema_weight=0.1, ema_range=(7, n), segments=seg, gate=gate, **HP)
        return st

    plain = step(state(), None)
    finite = step(state(), torch.tensor([123.5], device=DEV))
    for a, b in zip(finite, plain):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0], p0)                     # the update did change the masters
    for bad in (float("inf"), float("nan"), float("-inf")):
        kept = step(state(), torch.tensor([bad], device=DEV))
        for a, b in zip(kept, state()):
            assert torch.equal(a, b), bad
    with pytest.raises(ValueError, match="gate must be a 1-element float32 tensor"):
        step(state(), torch.tensor([1.0, 2.0], device=DEV))
    with pytest.raises(ValueError, match="gate must be a 1-element float32 tensor"):
        step(state(), torch.tensor([1.0], dtype=torch.float64, device=DEV))
