"""benchmarks/bench_peers.py on the CPU: the flash-attn stand-in that serves flash-nsa's window branch on
the device, nsa-parallel's wiring of flash-nsa's compressions, and the result tables. (The peers
themselves are not in the repository: `--dry-run` checks them where scripts/fetch_peers.sh put them.)"""
import sys
from pathlib import Path

import pytest
import torch

from nsa_parallel import reference

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402


def test_flash_attn_stand_in_is_flash_attns_window():
    """Called as flash-nsa calls flash-attn 3 (window (40, -1)): our reference window of 41 keys."""
    result = bench_peers.check_flash_attn_stand_in(torch.device("cpu"), torch.float32)
    for key in ("out", "dq", "dk", "dv"):
        assert result[key] < 1e-5, (key, result[key])


@pytest.mark.parametrize("method", ["mean", "linear", "swiglu", "sigmoid-mul"])
def test_flash_nsa_compressions(method):
    """Blocks [16i, 16i+32): the mean, or flatten(block) @ W.T (then the gated halves), one W for all heads."""
    torch.manual_seed(0)
    d = 8
    x = torch.randn(1, 101, 3, d, dtype=torch.float64)
    flat = reference.unfold_blocks(x, 32, 16).flatten(-2)  # [B, Tc, G, 32*d]
    if method == "mean":
        want = flat.view(*flat.shape[:-1], 32, d).mean(-2)
        got = bench_peers.overlap_mean(x)
    else:
        w = torch.randn(d * (1 if method == "linear" else 2), 32 * d, dtype=torch.float64)
        hidden = torch.einsum("btgi,oi->btgo", flat, w)
        if method == "linear":
            want = hidden
        else:
            gate, up = hidden[..., :d], hidden[..., d:]
            want = (torch.nn.functional.silu(gate) if method == "swiglu" else torch.sigmoid(gate)) * up
        got = bench_peers.learned_compress(x, w, method)
    assert got.shape == (1, (101 - 32) // 16 + 1, 3, d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert bench_peers.overlap_mean(x[:, :31]).shape[1] == 0


def test_tables():
    rows = [{"T": 65536, "contestant": name, "fwd_ms": fwd, "bwd_ms": 2 * fwd, "fb_ms": 3 * fwd, "peak_mib": 10.0,
             "status": "ok"} for name, fwd in (("sdpa-flash", 200.0), ("sdpa-cudnn", 120.0), ("ours-paper", 40.0),
                                               ("flash-nsa-mean", 34.0), ("ours@flash-nsa-mean", 17.0))]
    rows.append({"T": 65536, "contestant": "fla", "status": "OOM"})
    info = {"device": "test", "torch": "t", "triton": "t", "dtype": "bfloat16", "heads": 64, "kv_heads": 4,
            "head_dim": 128, "peers": {}, "dry_run": False, "rows": rows,
            "checks": [{"T": 65536, "pair": "flash-nsa-mean vs ours@flash-nsa-mean", "out": 2e-3, "dq": 3e-3}]}
    tables = bench_peers.markdown(info)
    assert "| 64k | 3.00x / 3.00x | 0.85x / 0.85x | - / - | 2.00x / 2.00x | - / - | - / - | 10 / 10 |" in tables
    assert "| 64k | fla | - | - | - | - | OOM |" in tables
    assert "| 65536 | flash-nsa-mean vs ours@flash-nsa-mean | 2.0e-03 | 3.0e-03 | - |" in tables
