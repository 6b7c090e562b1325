"""When the kernels stream tiles by TMA (nsa_kernels.tma): the rule, and that it is not skipped silently."""
import pytest
import torch

import nsa_kernels.tma as tma
from conftest import DEVICE

SIXTEEN_BIT = [torch.float16, torch.bfloat16]


def _tensor(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_applies_to_16_bit_power_of_two_heads(dtype):
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90 or newer")
    assert tma.applies(_tensor(2, 72, 2, 64, dtype=dtype), _tensor(1, 8, 4, 128, dtype=dtype), _tensor(1, 3, 1, 16, dtype=dtype))


def test_does_not_apply_where_a_box_cannot_be_cut():
    assert not tma.applies(_tensor(1, 8, 2, 64, dtype=torch.float32))   # 32-bit: the gather path
    assert not tma.applies(_tensor(1, 8, 2, 192))                        # not a power of two
    assert not tma.applies(_tensor(1, 8, 2, 8))                          # below 16
    assert not tma.applies(_tensor(1, 8, 4, 64).transpose(1, 2))         # not contiguous
    unaligned = _tensor(1 + 8 * 64).narrow(0, 1, 8 * 64).view(1, 8, 1, 64)  # 2-byte offset
    assert not tma.applies(unaligned)


def test_switch_and_box_limits(monkeypatch):
    x = _tensor(1, 8, 2, 64)
    assert list(tma.row_tiles(x, 16).block_shape) == [16, 64]
    with pytest.raises(ValueError, match="1 to 256 rows"):
        tma.row_tiles(x, 512)
    monkeypatch.setattr(tma, "ENABLED", False)
    assert not tma.applies(x)
