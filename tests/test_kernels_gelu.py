"""fastdit.kernels.gelu: GELU(tanh) backward + the bias gradient (+ GELU itself) in one pass, against
PyTorch's GELU backward and column sum. CPU: through the Triton interpreter (tests/conftest.py)."""
import pytest
import torch

from fastdit.kernels.gelu import _gelu_tanh_bwd_op, gelu_tanh_bwd, gelu_tanh_bwd_op, gelu_tanh_bwd_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(m, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(m, c, generator=g) * 3).to(DEV, dtype)      # reaches GELU's flat tails (|u| > 15 clamps)
    dg = torch.randn(m, c, generator=g).to(DEV, dtype)
    return z, dg


@pytest.mark.parametrize("m,c,tiling", [(301, 200, dict(rows_per_tile=64, block_m=16, block_c=64)),
                                        (64, 128, dict(rows_per_tile=64, block_m=32, block_c=128)),
                                        (7, 33, {}), (0, 16, {})])
@pytest.mark.parametrize("write_g", [False, True])
@pytest.mark.parametrize("sums", ["step", "once"])
def test_fp32_matches_pytorch(monkeypatch, m, c, tiling, write_g, sums):
    monkeypatch.setenv("FASTDIT_KERNEL_POISON", "1")
    monkeypatch.setenv("FASTDIT_COLUMN_SUMS", sums)               # both accumulations of the bias gradient
    z, dg = _inputs(m, c, torch.float32)
    dz, db, g = gelu_tanh_bwd(z, dg, write_g=write_g, **tiling)
    rdz, rdb, rg = gelu_tanh_bwd_ref(z, dg, write_g=True)
    torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-4)
    assert db.dtype == torch.float32 and db.shape == (c,)
    if write_g:
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
    else:
        assert g is None


@pytest.mark.parametrize("reduce_once", [False, True])
def test_bf16_rounds_like_pytorch_and_sums_before_rounding(reduce_once):
    z, dg = _inputs(257, 96, torch.bfloat16, seed=1)
    dz, db, g = gelu_tanh_bwd(z, dg, write_g=True, rows_per_tile=32, reduce_once=reduce_once)
    rdz, _, rg = gelu_tanh_bwd_ref(z, dg, write_g=True)
    assert dz.dtype == g.dtype == torch.bfloat16
    # one bf16 rounding step apart, or (in GELU's negative tail, where 1 + tanh(u) cancels in fp32 for both
    # formulas) a few 1e-6 absolute
    torch.testing.assert_close(dz.float(), rdz.float(), rtol=2 ** -7, atol=1e-5)
    torch.testing.assert_close(g.float(), rg.float(), rtol=2 ** -7, atol=1e-5)
    # the bias gradient is the sum of the unrounded fp32 dz: closer to fp64 than the sum of rounded dz
    exact = torch.ops.aten.gelu_backward(dg.double(), z.double(), approximate="tanh").sum(0)
    assert (db.double() - exact).abs().max() <= (rdz.double().sum(0) - exact).abs().max() * 1.01 + 1e-6


def test_strided_inputs():
    z, dg = _inputs(40, 64, torch.float32)
    zt = z.t().contiguous().t()                                   # column-major view of the same values
    dz, db, _ = gelu_tanh_bwd(zt, dg[:, :], rows_per_tile=16)
    rdz, rdb, _ = gelu_tanh_bwd_ref(z, dg)
    torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-5)
    assert dz.is_contiguous()


def test_registered_op_and_its_fake():
    z, dg = _inputs(48, 32, torch.float32)
    torch.library.opcheck(_gelu_tanh_bwd_op, (z, dg, True))
    torch.library.opcheck(_gelu_tanh_bwd_op, (z, dg, False))
    dz, db, g = gelu_tanh_bwd_op(z, dg)
    assert g is None and dz.shape == z.shape and db.shape == (32,)


@pytest.mark.parametrize("args,exc,msg", [
    ((torch.zeros(4, 4), torch.zeros(4, 5)), ValueError, "dg has shape"),
    ((torch.zeros(4, 4, 2), torch.zeros(4, 4, 2)), ValueError, "2 dimensions"),
    ((torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 4, dtype=torch.float64)), TypeError, "dtype"),
])
def test_bad_inputs(args, exc, msg):
    with pytest.raises(exc, match=msg):
        gelu_tanh_bwd(*[a.to(DEV) for a in args])
    with pytest.raises(ValueError, match="power of two"):
        gelu_tanh_bwd(torch.zeros(4, 4, device=DEV), torch.zeros(4, 4, device=DEV), block_c=48)
