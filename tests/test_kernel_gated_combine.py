import pytest
import torch

from nsa_kernels.gated_combine import gated_combine

from conftest import KERNEL_DTYPES, check_forward_backward


def combine_reference(o_cmp, o_slc, o_win, gates):
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (2, 37, 3, 128), (1, 19, 4, 192)])
def test_gated_combine_matches_float64(shape, dtype):
    outs = [torch.randn(shape) for _ in range(3)]
    gates = torch.rand(*shape[:-1], 3)
    check_forward_backward(gated_combine, combine_reference, [*outs, gates], dtype, f"gated_combine {shape}")


def test_gated_combine_rejects_mismatched_gates():
    o = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="gates must be"):
        gated_combine(o, o, o, torch.zeros(1, 4, 2, 2))
