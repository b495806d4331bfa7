"""fastdit.training.ema on one process: the official update formula and a full state dict round trip.

The sharded paths (ZeRO-1/2/3 on 2 ranks) are exercised by tests/test_train.py, which checks the EMA
recurrence from the files of consecutive checkpoints.
"""
import pytest
import torch

from fastdit.training.ema import ShardedEMA


@pytest.mark.parametrize("one_pass", [False, True])
def test_ema_update_formula_and_round_trip(one_pass):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = ShardedEMA(net, decay=0.75, one_pass=one_pass)
    ref = {k: v.detach().clone().double() for k, v in net.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for k, v in net.state_dict().items():
            ref[k] = 0.75 * ref[k] + 0.25 * v.double()
    full = ema.full_state_dict()
    assert list(full) == list(net.state_dict())
    for k in ref:
        assert full[k].dtype == torch.float32
        torch.testing.assert_close(full[k].double(), ref[k], rtol=1e-6, atol=1e-7)
    other = ShardedEMA(net, decay=0.75)
    other.load_full_state_dict(full)
    for k, v in other.full_state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)
    bad = dict(full)
    bad.pop("0.weight")
    with pytest.raises(KeyError, match="0.weight"):
        other.load_full_state_dict(bad)


def _net_on_one_buffer(pad: int = 3):
    """A model whose parameters are views of one flat fp32 buffer with gaps, as DeepSpeed's ZeRO-1/2
    partition holds the masters, plus one parameter outside it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.LayerNorm(2))
    params = list(net.parameters())[:4]
    flat = torch.full((sum(p.numel() for p in params) + pad * len(params) + pad,), float("nan"))
    off = pad
    for p in params:
        flat[off: off + p.numel()] = p.detach().reshape(-1)
        p.data = flat[off: off + p.numel()].view(p.shape)
        off += p.numel() + pad
    return net, flat


@pytest.mark.parametrize("one_pass", [False, True])
def test_flat_ema_equals_the_per_piece_ema(one_pass):
    net, flat = _net_on_one_buffer()
    merged = ShardedEMA(net, decay=0.9, one_pass=one_pass, flat=True)
    assert len(merged.flat) == 1 and len(merged.flat[0].members) == 4          # the LayerNorm is separate
    net2, _ = _net_on_one_buffer()
    x = ShardedEMA(net2, decay=0.9, one_pass=one_pass)
    y = ShardedEMA(net2, decay=0.9, one_pass=one_pass, flat=True)
    for _ in range(5):
        with torch.no_grad():
            for p in net2.parameters():
                p.add_(torch.randn_like(p))
        x.update()
        y.update()
    x.update(decay=0.5)
    y.update(decay=0.5)
    fx, fy = x.full_state_dict(), y.full_state_dict()
    for k in fx:
        assert torch.equal(fx[k], fy[k]), k                                      # the same arithmetic
    # loading writes through the views into the flat buffer
    z = ShardedEMA(net2, decay=0.9, flat=True)
    z.load_full_state_dict(fx)
    assert all(torch.equal(v, fx[k]) for k, v in z.full_state_dict().items())
    assert torch.equal(z.flat[0].buffer[:12], fx["0.weight"].reshape(-1))         # starts at the first piece


def test_flat_segment_and_done_groups():
    net, flat = _net_on_one_buffer(pad=2)
    ema = ShardedEMA(net, decay=0.5, flat=True)
    k, buf, lo, hi = ema.flat_segment(flat)
    assert (k, lo, hi) == (0, 2, flat.numel() - 2) and buf is ema.flat[0].buffer
    assert ema.flat_segment(flat[1:])[2:] == (1, flat.numel() - 3)
    assert ema.flat_segment(torch.zeros(5)) is None
    before = buf.clone()
    ln_before = ema.full_state_dict()["2.weight"].clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(done=[k])                          # the caller updated group k: only the LayerNorm moves
    torch.testing.assert_close(buf, before, rtol=0, atol=0, equal_nan=True)  # gaps: NaN here, never read
    torch.testing.assert_close(ema.full_state_dict()["2.weight"], ln_before + 0.5)


def test_flat_ema_refuses_a_moved_master():
    net, flat = _net_on_one_buffer()
    ema = ShardedEMA(net, decay=0.5, flat=True)
    ema.update()
    first = next(net.parameters())
    first.data = first.detach().clone()           # the master now lives elsewhere
    with pytest.raises(RuntimeError, match="moved"):
        ema.update()


def test_ema_follows_moved_data_and_refuses_replaced_parameters():
    """The EMA walks the model's parameters once: values moved in place (DeepSpeed re-points .data) are followed
    at every update; a Parameter object replaced after the EMA was built is found at the next full check (the
    first update, then every FULL_CHECK_EVERY) and is an error, not a silent average of a stale tensor."""
    from fastdit.training import ema as ema_mod
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    w0 = net.weight.detach().clone()
    ema = ShardedEMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.data = torch.ones(2, 3)          # new storage, the same Parameter object
    ema.update()
    torch.testing.assert_close(ema.full_state_dict()["weight"], 0.5 * w0 + 0.5 * torch.ones(2, 3))
    net.weight = torch.nn.Parameter(torch.zeros(2, 3))
    for _ in range(ema_mod.FULL_CHECK_EVERY - 1):   # between full checks the cached objects are used
        ema.update()
    with pytest.raises(RuntimeError, match="parameters were replaced since the EMA was built"):
        ema.update()
