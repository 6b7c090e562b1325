import math

from nsa_parallel.demo import main


def test_demo_runs_a_few_steps():
    assert math.isfinite(main(["--steps", "2", "--seq-len", "64", "--batch", "2"]))
