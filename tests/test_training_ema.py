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
