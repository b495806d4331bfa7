"""fastdit.kernels.qkv_grads: dq, dk, dv stacked into dqkv (N, T, 3, H, hd) with the qkv bias gradient
from the same pass, against torch.stack and a float64 column sum. CPU: through the Triton interpreter
(tests/conftest.py)."""
import pytest
import torch

from fastdit.kernels.qkv_grads import (_stack_qkv_grads_op, stack_qkv_grads, stack_qkv_grads_op,
                                       stack_qkv_grads_ref, tile_shape)

pytestmark = pytest.mark.triton
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(n, h, t, hd, dtype, layout, seed=0):
    """dq, dk, dv (N, H, T, hd) in a layout: "packed" = strided views of one (N, T, 3, H, hd) buffer (the
    model's qkv layout), "bshd" = three tensors laid out (N, T, H, hd) (what SDPA's backward allocates for the
    packed views: torch.empty_like keeps their stride order), "contiguous" = three (N, H, T, hd) tensors,
    "transposed" = hd-major strides."""
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        buf = torch.randn(n, t, 3, h, hd, generator=g).to(DEV, dtype)
        return [buf[:, :, i].permute(0, 2, 1, 3) for i in range(3)]
    if layout == "bshd":
        return [torch.randn(n, t, h, hd, generator=g).to(DEV, dtype).transpose(1, 2) for _ in range(3)]
    out = [torch.randn(n, h, t, hd, generator=g).to(DEV, dtype) for _ in range(3)]
    if layout == "transposed":
        out = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in out]
    return out


def _check(dqkv, db, dq, dk, dv, atol=1e-4):
    n, h, t, hd = dq.shape
    ref, _ = stack_qkv_grads_ref(dq, dk, dv)
    assert dqkv.shape == (n, t, 3, h, hd) and dqkv.is_contiguous() and dqkv.dtype == ref.dtype
    assert torch.equal(dqkv, ref)                                  # a copy: exact
    exact = ref.double().reshape(n * t, -1).sum(0)
    assert db.dtype == torch.float32 and db.shape == (3 * h * hd,)
    torch.testing.assert_close(db.double(), exact, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("layout", ["packed", "bshd", "contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,tiling", [((2, 3, 9, 24), dict(rows_per_tile=4, block_m=2)),
                                          ((2, 16, 16, 72), {}),          # DiT-XL's heads and head dim
                                          ((1, 5, 7, 64), dict(rows_per_tile=3, block_m=1)),
                                          ((3, 2, 5, 9), {})])
@pytest.mark.parametrize("sums", ["step", "once"])
def test_matches_stack_and_column_sum(monkeypatch, shape, tiling, dtype, layout, sums):
    monkeypatch.setenv("FASTDIT_KERNEL_POISON", "1")              # an unwritten element stays NaN
    monkeypatch.setenv("FASTDIT_COLUMN_SUMS", sums)               # both accumulations of the column sums
    dq, dk, dv = _grads(*shape, dtype, layout)
    dqkv, db = stack_qkv_grads(dq, dk, dv, **tiling)
    _check(dqkv, db, dq, dk, dv)          # bf16 too: the sums of the exact bf16 values, in fp32


def test_registered_op_fake_and_empty():
    dq, dk, dv = _grads(2, 3, 9, 24, torch.float32, "packed")
    dqkv, db = stack_qkv_grads_op(dq, dk, dv)
    _check(dqkv, db, dq, dk, dv)
    torch.library.opcheck(_stack_qkv_grads_op, (dq, dk, dv))
    e = torch.zeros(2, 3, 0, 8, device=DEV)
    dqkv, db = stack_qkv_grads(e, e, e)
    assert dqkv.shape == (2, 0, 3, 3, 8) and torch.equal(db, torch.zeros(72, device=DEV))


def test_tile_shape():
    assert tile_shape(72) == (8, 4, 128)                          # DiT-XL: 4096 elements, 4 heads per program
    assert tile_shape(64) == (16, 4, 64)
    for hd in (1, 9, 72, 200, 256):
        bm, bh, bhd = tile_shape(hd)
        assert bhd >= hd and bm * bh * bhd <= 4096 and bm >= 1


def test_alignment_rule_and_unaligned_inputs():
    """16-byte loads are promised only for hd-contiguous, 8-element-multiple strides from an aligned start;
    anything else (here an input starting one element into its buffer) runs the unit-stride path, right."""
    from fastdit.kernels.qkv_grads import aligned
    assert aligned(*_grads(2, 3, 9, 24, torch.float32, "packed"))
    assert not aligned(*_grads(3, 2, 5, 9, torch.float32, "packed"))
    assert not aligned(*_grads(2, 3, 9, 24, torch.float32, "transposed"))
    buf = torch.randn(2, 9, 3, 3, 25, device=DEV)
    dq, dk, dv = [buf[:, :, i, :, 1:].permute(0, 2, 1, 3) for i in range(3)]   # hd 24, offset by 1 element
    assert not aligned(dq, dk, dv)
    dqkv, db = stack_qkv_grads(dq, dk, dv, rows_per_tile=4, block_m=2)
    _check(dqkv, db, dq, dk, dv)


def test_bad_inputs_raise():
    dq, dk, dv = _grads(2, 3, 9, 24, torch.float32, "contiguous")
    with pytest.raises(ValueError, match="one shape"):
        stack_qkv_grads(dq, dk[:, :2], dv)
    with pytest.raises(ValueError, match="4 dimensions"):
        stack_qkv_grads(dq[0], dk[0], dv[0])
    with pytest.raises(TypeError, match="dtype"):
        stack_qkv_grads(dq.double(), dk, dv)
    with pytest.raises(ValueError, match="power of two"):
        stack_qkv_grads(dq, dk, dv, block_m=3)
    with pytest.raises(ValueError, match="same device"):
        stack_qkv_grads(dq, dk.to("meta"), dv)


def test_flat_kernel_takes_the_packed_and_sdpa_layouts():
    """Under FASTDIT_COLUMN_SUMS=once, inputs whose (h, d) columns are one contiguous run per row take the flat
    kernel: the model's packed views and the gradients SDPA allocates for them (torch.empty_like of a packed
    view keeps its (N, T, H, hd) stride order); (N, H, T, hd)-contiguous and hd-major inputs do not."""
    from fastdit.kernels.qkv_grads import flat_columns
    packed = _grads(2, 3, 9, 24, torch.float32, "packed")
    assert flat_columns(*packed) and flat_columns(*[torch.empty_like(g) for g in packed])
    assert flat_columns(*_grads(2, 3, 9, 24, torch.float32, "bshd"))
    assert not flat_columns(*_grads(2, 3, 9, 24, torch.float32, "contiguous"))
    assert not flat_columns(*_grads(2, 3, 9, 24, torch.float32, "transposed"))
    one_head = [g[:, :1] for g in _grads(2, 3, 9, 24, torch.float32, "contiguous")]
    assert flat_columns(*one_head)                                 # one head: its hd columns, stride 1
    dqkv, db = stack_qkv_grads(*one_head, reduce_once=True)
    _check(dqkv, db, *one_head)


def test_column_sums_switch(monkeypatch):
    """FASTDIT_COLUMN_SUMS picks the accumulation at each call (reduce_once= overrides it) and gives the same
    sums either way up to fp32 rounding; any other value is a one-line error."""
    dq, dk, dv = _grads(2, 3, 9, 24, torch.float32, "packed")
    monkeypatch.setenv("FASTDIT_COLUMN_SUMS", "once")
    once = stack_qkv_grads(dq, dk, dv, rows_per_tile=8, block_m=2)[1]
    stepped = stack_qkv_grads(dq, dk, dv, rows_per_tile=8, block_m=2, reduce_once=False)[1]
    torch.testing.assert_close(once, stepped, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("FASTDIT_COLUMN_SUMS", "rows")
    with pytest.raises(ValueError, match=r"FASTDIT_COLUMN_SUMS='rows'; choose one of \('step', 'once'\)"):
        stack_qkv_grads(dq, dk, dv)


@pytest.mark.gpu
@pytest.mark.parametrize("reduce_once", [False, True])
def test_gpu_xl_shape_bf16(reduce_once):
    """DiT-XL/2's attention gradient at batch 32, bf16, in the packed layout, SDPA's and contiguous, with
    either accumulation of the column sums (FASTDIT_COLUMN_SUMS)."""
    for layout in ("packed", "bshd", "contiguous"):
        dq, dk, dv = _grads(32, 16, 256, 72, torch.bfloat16, layout)
        dqkv, db = stack_qkv_grads(dq, dk, dv, reduce_once=reduce_once)
        _check(dqkv, db, dq, dk, dv, atol=1e-3)


@pytest.mark.gpu
def test_gpu_sdpa_gradients_of_packed_views_take_the_flat_kernel():
    """SDPA's backward (cuDNN or flash on an H100) returns dq, dk, dv of the model's packed qkv views with their
    (h, d) columns contiguous per row, so FASTDIT_COLUMN_SUMS=once stacks them with the flat kernel (the
    prediction for bias_fold's rows rests on it); and the stack of those gradients is exact."""
    from fastdit.kernels.qkv_grads import flat_columns
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(8, 256, 3, 16, 72, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)                  # (N, H, T, hd) views, as _inner_sdpa
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert flat_columns(dq, dk, dv), [x.stride() for x in (dq, dk, dv)]
    dqkv, db = stack_qkv_grads(dq, dk, dv, reduce_once=True)
    _check(dqkv, db, dq, dk, dv, atol=1e-3)
