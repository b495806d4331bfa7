"""fastdit.weights.layout: which files make a checkpoint folder a ZeRO one."""
import pytest

from fastdit.weights import layout


@pytest.mark.parametrize("names,expect", [
    (["mp_rank_00_model_states.pt", "ema.pt"], False),                                  # ZeRO-0
    (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], True),  # fp32 ZeRO-1/2
    (["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"], True),  # bf16 ZeRO-1/2
    (["zero_pp_rank_0_mp_rank_00_model_states.pt"], True),                              # ZeRO-3
])
def test_has_zero_shards_knows_deepspeeds_bf16_names(tmp_path, names, expect):
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert layout.has_zero_shards(str(tmp_path)) is expect
