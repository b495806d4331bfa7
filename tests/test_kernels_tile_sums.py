"""fastdit.kernels.tile_sums: the row ops' per-tile partial sums added in one Triton pass
(FASTDIT_TILE_SUMS=triton) against float64 sums and against the PyTorch path (the default). CPU: through the
Triton interpreter (tests/conftest.py)."""
import importlib

import pytest
import torch

TS = importlib.import_module("fastdit.kernels.tile_sums")
ML = importlib.import_module("fastdit.kernels.modulate_layernorm")
GR = importlib.import_module("fastdit.kernels.gated_residual")

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _part(p, r, s, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, r, s, c, generator=g).to(DEV)


def _launches(monkeypatch):
    """Count the Triton kernel's launches."""
    seen = []
    kernel = TS._tile_sums_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **k):
                seen.append(k["P"])
                return kernel[grid](*a, **k)
            return launch
    monkeypatch.setattr(TS, "_tile_sums_kernel", Spy())
    return seen


@pytest.mark.parametrize("shape", [(3, 2, 5, 40), (1, 3, 1, 7), (2, 1, 19, 300), (3, 4, 8, 256)])
def test_triton_sums_match_float64(shape, monkeypatch):
    """Every part summed over its tiles (S across several BLOCK_S steps and partial ones; C across column
    blocks), each written in its own dtype: fp32 to rounding, bf16 / fp16 within one rounding of the exact sum."""
    monkeypatch.setenv(TS.ENV, "triton")
    seen = _launches(monkeypatch)
    part = _part(*shape)
    dtypes = [torch.float32, torch.bfloat16, torch.float16][:shape[0]]
    outs = TS.tile_sums(part, dtypes)
    assert seen == [len(dtypes)]
    exact = part.double().sum(2)
    for i, (o, dt) in enumerate(zip(outs, dtypes)):
        assert o.dtype == dt and o.shape == shape[1:2] + shape[3:] and o.is_contiguous()
        tol = dict(rtol=1e-6, atol=1e-6) if dt == torch.float32 else dict(rtol=torch.finfo(dt).eps, atol=1e-3)
        torch.testing.assert_close(o.double(), exact[i], **tol)


def test_fewer_dtypes_than_parts_and_the_torch_default(monkeypatch):
    part = _part(4, 3, 6, 33)
    monkeypatch.delenv(TS.ENV, raising=False)
    seen = _launches(monkeypatch)
    ref = TS.tile_sums(part, [torch.float32, torch.bfloat16])            # the default: PyTorch, no launch
    assert seen == [] and TS.mode() == "torch"
    assert torch.equal(ref[0], part[0].sum(1)) and torch.equal(ref[1], part[1].sum(1).to(torch.bfloat16))
    monkeypatch.setenv(TS.ENV, "triton")
    got = TS.tile_sums(part, [torch.float32, torch.bfloat16])
    assert seen == [2]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    assert (got[1].float() - ref[1].float()).abs().max() <= 1e-2 * ref[1].float().abs().max()


def test_no_tiles_gives_zeros_and_bad_inputs_raise(monkeypatch):
    monkeypatch.setenv(TS.ENV, "triton")
    out = TS.tile_sums(torch.empty(2, 3, 0, 5, device=DEV), [torch.bfloat16, torch.float32])
    assert [o.dtype for o in out] == [torch.bfloat16, torch.float32]
    assert all(o.shape == (3, 5) and not o.any() for o in out)
    with pytest.raises(ValueError, match="float32 tensor with unit column stride"):
        TS.tile_sums(torch.zeros(2, 3, 4, 5, device=DEV, dtype=torch.bfloat16), [torch.float32])
    with pytest.raises(ValueError, match="float32 tensor with unit column stride"):
        TS.tile_sums(torch.zeros(2, 3, 5, 4, device=DEV).transpose(2, 3), [torch.float32])
    with pytest.raises(ValueError, match="takes 1 to 2 dtypes here"):
        TS.tile_sums(torch.zeros(2, 3, 4, 5, device=DEV), [torch.float32] * 3)
    monkeypatch.setenv(TS.ENV, "cuda")
    with pytest.raises(ValueError, match="FASTDIT_TILE_SUMS='cuda'; choose one of"):
        TS.tile_sums(torch.zeros(1, 3, 4, 5, device=DEV), [torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_ops_backward_the_same_either_way(dtype, monkeypatch):
    """The three row ops' backward launchers with FASTDIT_TILE_SUMS=triton give the PyTorch path's results:
    the row gradients bitwise (untouched), the (N, D) sums and d(bias) to fp32 reordering, one launch each."""
    n, t, d = 3, 13, 40
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g).to(DEV, dtype)
    x, y, dh, dxnew, gate, shift, scale, bias = r(n, t, d), r(n, t, d), r(n, t, d), r(n, t, d), r(n, d), \
        r(n, d), r(n, d), r(d)
    _, mean, rstd = ML.modulate_layernorm_fwd(x, shift, scale)
    xnew, _, m2, r2 = ML.gated_residual_modulate_layernorm_fwd(x, y, gate, shift, scale, bias=bias)
    tiling = dict(block_t=2, tokens_per_tile=4)                         # 4 tiles per sample
    calls = [
        lambda: ML.modulate_layernorm_bwd(dh, x, scale, mean, rstd, dtype, **tiling),
        lambda: ML.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, m2, r2, dtype, dtype,
                                                          **tiling),
        lambda: ML.gated_residual_modulate_layernorm_bwd(dh, dxnew, xnew, y, gate, scale, m2, r2, dtype, dtype,
                                                          bias=bias, **tiling),
        lambda: GR.gated_residual_bwd(dh, y, gate, **tiling),
    ]
    for call in calls:
        monkeypatch.setenv(TS.ENV, "torch")
        ref = call()
        monkeypatch.setenv(TS.ENV, "triton")
        seen = _launches(monkeypatch)
        got = call()
        assert len(seen) == (2 if len(ref) == 6 else 1)                    # the sums, then d(bias)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a.dtype == b.dtype and a.shape == b.shape
            if a.dim() == 3:
                assert torch.equal(a, b)                                    # dx, dy: the same kernel
            else:
                rtol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.float().abs().max())
        monkeypatch.undo()
