"""benchmarks/megatron_lm_summary.py reads Megatron-LM's own log lines (the format strings of
megatron/training/training.py and utils/common_utils.py at core_r0.19.0)."""
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import megatron_lm_summary as summary  # noqa: E402


def _iteration(step: int, total: int, ms: float, loss: float, grad_norm: float) -> str:
    line = " [2026-09-01 10:00:00.000000]" + " iteration {:8d}/{:8d} |".format(step, total)
    line += " consumed samples: {:12d} |".format(4 * step) + " elapsed time per iteration (ms): {:.1f} |".format(ms)
    line += " throughput per GPU (TFLOP/s/GPU): 12.3 |" + f" learning rate: {3e-4:.6E} |"
    line += f" global batch size: {4:5d} |"
    line += " {}: {:.6E} |".format("lm loss", loss) + f" loss scale: {1.0:.1f} |" + f" grad norm: {grad_norm:.3f} |"
    return line + " number of skipped iterations: {:3d} |".format(0) + " number of nan iterations: {:3d} |".format(0)


def _log(steps: range, total: int, loaded: int | None = None) -> str:
    lines = [f"  successfully loaded checkpoint from /tmp/ckpt [ t 1/1, gtp_remat 1/1, p 1/1 ] at iteration {loaded}"
             ] if loaded else []
    for step in steps:
        lines.append(_iteration(step, total, 5000.0 if step == steps[0] else 100.0 + step, 8.3 - 0.1 * step, 2.5))
        if step == steps[-1]:
            lines.append(f"[Rank 0] (after {step} iterations) memory (MB) | allocated: 1000.00 | max allocated: "
                         f"{2000.0 + step:.2f} | reserved: 3000.00 | max reserved: 3000.00")
    return "\n".join(lines)


def test_parse_and_compare():
    nsa, resumed = summary.parse_log(_log(range(1, 21), 20)), summary.parse_log(_log(range(11, 21), 20, loaded=10))
    assert nsa["loss"][1] == 8.2 and nsa["ms"][1] == 5000.0 and nsa["grad_norm"][20] == 2.5
    assert nsa["max_allocated_mb"] == 2020.0 and "loaded_iteration" not in nsa
    assert nsa["mean_ms"] == sum(100.0 + s for s in range(3, 21)) / 18  # iterations 1-2 not timed
    out = summary.summarise({"nsa": nsa, "nsa_resume": resumed, "default": summary.parse_log(_log(range(1, 21), 20))})
    assert out["resume"] == {"loaded_iteration": 10, "first_iteration": 11, "max_rel_loss_diff": 0.0}
    assert out["nsa"]["final_iteration"] == 20 and abs(out["default"]["final_loss"] - 6.3) < 1e-9
