"""fastdit.kernels.gemm_gelu: the MLP's GEMMs with GELU (forward) and GELU' + bias sums (backward) in the
epilogue, against PyTorch's linear / GELU / GELU backward / column sum. CPU: through the Triton interpreter
(tests/conftest.py)."""
import importlib

import pytest
import torch

from fastdit.kernels.gemm_gelu import (CONFIG_ENV, DEFAULT_CONFIG, SWEEP, GemmConfig, default_config, linear_dgelu,
                                       linear_dgelu_op, linear_dgelu_ref, linear_gelu, linear_gelu_op,
                                       linear_gelu_ref, parse_config, tma_usable)

gg = importlib.import_module("fastdit.kernels.gemm_gelu")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GemmConfig(32, 32, 16, 4, 2, group_m=2)   # several tiles, groups and K steps at test sizes
SMALL_TMA = SMALL._replace(tma=True)


def _inputs(m, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, k, generator=g)
    w1 = torch.randn(n, k, generator=g) * 2 / k ** 0.5       # z reaches GELU's tails
    b1 = torch.randn(n, generator=g)
    dy = torch.randn(m, k, generator=g)
    w2 = torch.randn(k, n, generator=g) / k ** 0.5
    return [t.to(DEV, dtype) for t in (h, w1, b1, dy, w2)]


@pytest.mark.parametrize("m,k,n,cfg", [(70, 48, 72, SMALL),            # edge tiles in M and N, K % BLOCK_K == 0
                                       (33, 40, 100, SMALL),           # K % BLOCK_K != 0 (masked K steps)
                                       (130, 64, 96, GemmConfig(64, 32, 32, 4, 3, group_m=8)),
                                       (70, 48, 72, SMALL_TMA),        # TMA: out-of-bounds tiles read as zeros
                                       (33, 40, 100, SMALL_TMA),       # TMA: a partial last K step
                                       (5, 24, 17, None),              # the default tiling: fp32 rows of 17 are
                                       (5, 24, 20, None)])             # not TMA-addressable, rows of 20 are
def test_fp32_matches_pytorch(monkeypatch, m, k, n, cfg):
    monkeypatch.setenv("FASTDIT_KERNEL_POISON", "1")
    h, w1, b1, dy, w2 = _inputs(m, k, n, torch.float32)
    z, g = linear_gelu(h, w1, b1, config=cfg)
    rz, rg = linear_gelu_ref(h, w1, b1)
    torch.testing.assert_close(z, rz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5)
    assert z.is_contiguous() and g.is_contiguous() and z.dtype == g.dtype == torch.float32
    for write_g in (False, True):
        dz, db, g2 = linear_dgelu(dy, w2, rz, write_g=write_g, config=cfg)
        rdz, rdb, _ = linear_dgelu_ref(dy, w2, rz)
        torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-4)
        assert db.dtype == torch.float32 and db.shape == (n,)
        if write_g:
            torch.testing.assert_close(g2, rg, rtol=1e-5, atol=1e-5)
            assert g2.is_contiguous()
        else:
            assert g2 is None


def test_no_bias():
    h, w1, _, _, _ = _inputs(40, 32, 48, torch.float32)
    z, g = linear_gelu(h, w1, None, config=SMALL)
    rz, rg = linear_gelu_ref(h, w1, None)
    torch.testing.assert_close(z, rz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [SMALL, SMALL_TMA])
def test_bf16_against_fp64(cfg):
    """bf16: z is the GEMM rounded once (as cuBLAS's), g is GELU of that stored z, and dz / db are at least as
    close to the fp64 result as the reference's (which rounds dg to bf16 before GELU's backward)."""
    m, k, n = 96, 64, 80
    h, w1, b1, dy, w2 = _inputs(m, k, n, torch.bfloat16, seed=1)
    z, g = linear_gelu(h, w1, b1, config=cfg)
    exact_z = torch.nn.functional.linear(h.double(), w1.double(), b1.double())
    torch.testing.assert_close(z.double(), exact_z, rtol=2 ** -8, atol=1e-2)          # one rounding of the sum
    g_of_z = torch.nn.functional.gelu(z.float(), approximate="tanh").to(torch.bfloat16)
    torch.testing.assert_close(g.float(), g_of_z.float(), rtol=2 ** -7, atol=1e-5)    # GELU of the stored z
    dz, db, g2 = linear_dgelu(dy, w2, z, write_g=True, config=cfg)
    if cfg.tma:          # the backward's epilogue computes GELU(z) as the forward's did
        _assert_same_gelu(g2, g)
    else:                # the pointer kernel leaves it to a separate (PyTorch) pass: one rounding apart
        torch.testing.assert_close(g2.float(), g.float(), rtol=2 ** -7, atol=1e-5)
    rdz, rdb, _ = linear_dgelu_ref(dy, w2, z)
    exact = torch.ops.aten.gelu_backward(dy.double().mm(w2.double()), z.double(), approximate="tanh")
    for ours, ref, want in ((dz, rdz, exact), (db, rdb, exact.sum(0))):
        err, err_ref = (ours.double() - want).abs().max(), (ref.double() - want).abs().max()
        assert err <= 1.5 * err_ref + 1e-6, (err, err_ref)


def test_tma_needs_aligned_rows_and_falls_back_to_pointers(monkeypatch):
    """TMA addresses rows whose stride is a multiple of 16 bytes; others (bf16 rows of 44 or 100) run the
    pointer kernel, with the same results."""
    h, w1, b1, dy, w2 = _inputs(40, 44, 96, torch.bfloat16)
    assert not tma_usable(h) and not tma_usable(torch.empty(40, 100, dtype=torch.bfloat16, device=DEV))
    assert tma_usable(torch.empty(40, 96, dtype=torch.bfloat16, device=DEV))
    assert not tma_usable(torch.empty(96, 40, dtype=torch.bfloat16, device=DEV).t())   # last stride not 1
    calls = []
    monkeypatch.setattr(gg, "_gemm_gelu_tma_kernel", _Recorder(gg._gemm_gelu_tma_kernel, calls, "tma"))
    monkeypatch.setattr(gg, "_gemm_gelu_kernel", _Recorder(gg._gemm_gelu_kernel, calls, "ptr"))
    z, g = linear_gelu(h, w1, b1, config=SMALL_TMA)
    assert calls == ["ptr"]
    z2, g2 = linear_gelu(h, w1, b1, config=SMALL)
    assert torch.equal(z, z2) and torch.equal(g, g2)
    h, w1, b1, dy, w2 = _inputs(40, 48, 96, torch.bfloat16)
    z, g = linear_gelu(h, w1, b1, config=SMALL_TMA)
    assert calls == ["ptr", "ptr", "tma"]
    # the backward's GELU(z): from the TMA epilogue, or after the pointer kernel from a separate pass; the same
    _, _, g_tma = linear_dgelu(dy, w2, z, write_g=True, config=SMALL_TMA)
    _, _, g_ptr = linear_dgelu(dy, w2, z, write_g=True, config=SMALL)
    assert calls[3:] == ["tma", "ptr"]
    _assert_same_gelu(g_tma, g)
    torch.testing.assert_close(g_ptr.float(), g.float(), rtol=2 ** -7, atol=1e-5)
    # misaligned rows (bf16 rows of K = 44): the pointer kernel both ways, and g from the separate pass
    h, w1, b1, dy, w2 = _inputs(40, 44, 48, torch.bfloat16)
    z, g = linear_gelu(h, w1, b1, config=SMALL_TMA)
    _, _, g_fb = linear_dgelu(dy, w2, z, write_g=True, config=SMALL_TMA)
    assert calls[5:] == ["ptr", "ptr"]
    torch.testing.assert_close(g_fb.float(), g.float(), rtol=2 ** -7, atol=1e-5)


class _Recorder:
    """A kernel's `kernel[grid](...)` that notes `name` in `calls` before launching."""

    def __init__(self, kernel, calls, name):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kernel[grid]


def _assert_same_gelu(a, b):
    """GELU(z) of the backward's epilogue vs the forward's: the same bits through the interpreter (one formula,
    no fused multiply-adds); on a GPU each kernel's compiler may contract the same expression differently, so at
    most one bf16 rounding apart there."""
    if DEV == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)


def test_strided_operands():
    h, w1, b1, dy, w2 = _inputs(50, 32, 64, torch.float32)
    ht = h.t().contiguous().t()                                  # column-major h
    w1t = w1.t().contiguous().t()
    z, g = linear_gelu(ht, w1t, b1, config=SMALL)
    rz, _ = linear_gelu_ref(h, w1, b1)
    torch.testing.assert_close(z, rz, rtol=1e-5, atol=1e-5)
    zt = rz.t().contiguous().t()
    dz, db, _ = linear_dgelu(dy[:, :], w2.t().contiguous().t(), zt, config=SMALL)
    rdz, rdb, _ = linear_dgelu_ref(dy, w2, rz)
    torch.testing.assert_close(dz, rdz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, rdb, rtol=1e-5, atol=1e-4)


def test_empty_shapes():
    h, w1, b1, dy, w2 = _inputs(0, 16, 32, torch.float32)
    z, g = linear_gelu(h, w1, b1)
    assert z.shape == g.shape == (0, 32)
    dz, db, g2 = linear_dgelu(dy, w2, z, write_g=True)
    assert dz.shape == g2.shape == (0, 32) and torch.equal(db, torch.zeros(32, device=DEV))
    # K = 0: z is the bias, dz and db are zero
    h0, w0 = torch.zeros(4, 0, device=DEV), torch.zeros(8, 0, device=DEV)
    z, g = linear_gelu(h0, w0, b1[:8])
    torch.testing.assert_close(z, b1[:8].expand(4, 8))
    dz, db, g2 = linear_dgelu(torch.zeros(4, 0, device=DEV), torch.zeros(0, 8, device=DEV), z, write_g=True)
    assert not dz.any() and not db.any()
    torch.testing.assert_close(g2, g)


def test_registered_ops_and_their_fakes():
    h, w1, b1, dy, w2 = _inputs(20, 16, 32, torch.float32)
    torch.library.opcheck(linear_gelu_op, (h, w1, b1))
    torch.library.opcheck(linear_gelu_op, (h, w1, None))
    z, _ = linear_gelu_op(h, w1, b1)
    torch.library.opcheck(gg._linear_dgelu_op, (dy, w2, z, False))
    torch.library.opcheck(gg._linear_dgelu_op, (dy, w2, z, True))
    dz, db, g = linear_dgelu_op(dy, w2, z)
    assert g is None and dz.shape == z.shape and db.shape == (32,)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda t: linear_gelu(t(4, 8), t(6, 7)), ValueError, "w1 has shape"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8), t(5)), ValueError, "b1 has shape"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8).double()), TypeError, "dtype"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8).bfloat16()), TypeError, "one dtype per call"),
    (lambda t: linear_gelu(t(4, 8, 1), t(6, 8)), ValueError, "2 dimensions"),
    (lambda t: linear_dgelu(t(4, 8), t(8, 6), t(4, 5)), ValueError, "must match z"),
    (lambda t: linear_dgelu(t(4, 8), t(8, 6), t(4, 6).half()), TypeError, "one dtype per call"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8), config=GemmConfig(48, 32, 16, 4, 2)), ValueError, "power of two"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8), config=GemmConfig(32, 32, 8, 4, 2)), ValueError, ">= 16"),
    (lambda t: linear_gelu(t(4, 8), t(6, 8), config=GemmConfig(32, 32, 16, 3, 2)), ValueError, "num_warps"),
])
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(lambda *s: torch.zeros(*s, device=DEV))


def test_config_from_the_environment(monkeypatch):
    assert default_config() == DEFAULT_CONFIG
    monkeypatch.setenv(CONFIG_ENV, "128x256x64/8/3")
    assert default_config() == GemmConfig(128, 256, 64, 8, 3)
    monkeypatch.setenv(CONFIG_ENV, "128x256x64/8/3/TMA")
    assert default_config() == GemmConfig(128, 256, 64, 8, 3, tma=True)
    assert all(parse_config(c.tag()) == c for c in SWEEP)
    for bad, why in (("128x128/8/4", "expected"), ("128x128x64/8", "expected"), ("big", "expected"),
                     ("128x128x64/8/3/tmb", "expected"),
                     ("128x128x48/8/4", "power of two"), ("128x128x64/8/0", "num_stages")):
        with pytest.raises(ValueError, match=f"{CONFIG_ENV}=.*{why}"):
            parse_config(bad)
    monkeypatch.setenv(CONFIG_ENV, "128x128x64/6/4")
    with pytest.raises(ValueError, match="num_warps"):
        linear_gelu(torch.zeros(4, 8, device=DEV), torch.zeros(6, 8, device=DEV))


def test_the_sm90_check_compiles_every_tiling_of_the_gpu_sweep():
    """`_sm90_check --gemm-sweep` builds a forward and a backward case per SWEEP config at DiT-XL/2's MLP shape,
    the default first; the default run of the check (every kernel) includes the default tiling."""
    check = importlib.import_module("fastdit.kernels._sm90_check")
    cases = check.gemm_gelu_sweep_cases()
    assert len(cases) == 2 * len(SWEEP) and SWEEP[0] == DEFAULT_CONFIG
    for i, cfg in enumerate(SWEEP):
        for (label, _, values, consts, (warps, stages)), backward in zip(cases[2 * i: 2 * i + 2], (False, True)):
            assert consts["BACKWARD"] is backward and consts["HAS_BIAS"] is not backward
            assert (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], warps, stages) == cfg[:5]
            assert (values["M"], values["N"], values["K"]) == (32768, 4608, 1152)
            assert label.endswith(cfg.tag())
            if cfg.tma:   # w1 (N, K) is read in (BLOCK_N, BLOCK_K) boxes in the forward, w2 (K, N) in (BLOCK_K, BLOCK_N)
                box = (cfg.block_k, cfg.block_n) if backward else (cfg.block_n, cfg.block_k)
                assert values["b_desc"] == "tensordesc<bf16[%d,%d]>" % box
            else:         # w1 (N, K) is read transposed in the forward, w2 (K, N) as it is in the backward
                assert (values["stride_bk"], values["stride_bn"]) == ((1, 1152) if not backward else (4608, 1))
    labels = [c[0] for c in check.cases()]
    for kind in ("fwd", "bwd", "bwd +g"):    # +g: the backward that rewrites GELU(z) (mlp="recompute-epilogue")
        assert f"gemm_gelu_{kind} {DEFAULT_CONFIG.tag()}" in labels
