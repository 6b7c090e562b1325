"""One model's quality run: train it with nsa-train, then score it with nsa-eval.

    python benchmarks/quality.py --config configs/quality-cpu.yaml --attention nsa --out outputs/quality-cpu
    python benchmarks/quality.py --config configs/quality-cpu.yaml --attention full --out outputs/quality-cpu
    nsa-eval --merge outputs/quality-cpu/{nsa,full}/eval/eval.json --out outputs/quality-cpu/compare

The run trains in this process's child (``--no-ray``) into ``OUT/<attention>`` (resuming there if it
was interrupted), then ``nsa-eval`` writes ``OUT/<attention>/eval/`` (eval.json, heat maps, loss
curve, summary.md). NSA and full attention runs of one config share the seed and so the data and
its order. The corpus at ``data.path`` is made from this Python's standard library first if it is
missing (``benchmarks/make_code_corpus.py``). Extra arguments are config overrides for training.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # run from a checkout, installed or not

from nsa_parallel.job_config import load_job_config  # noqa: E402


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "kernels"), str(ROOT / "launch"), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--attention", choices=("nsa", "full"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seq-lens", help="nsa-eval --seq-lens (default: half, once and twice the training length)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--samples", default="8", help="nsa-eval --samples")
    p.add_argument("--skip-training", action="store_true", help="only evaluate the run's latest checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    overrides = [f"model.attention={args.attention}", f"train.output_dir={args.out / args.attention}",
                 *args.overrides]
    config = load_job_config(args.config, overrides)
    corpus = config.data.path
    if corpus and not Path(corpus + ".bin").is_file():
        _run([sys.executable, str(ROOT / "benchmarks" / "make_code_corpus.py"), corpus])
    if not args.skip_training:
        _run([sys.executable, "-m", "nsa_parallel.train", "--config", str(args.config), "--no-ray", *overrides])
    lengths = args.seq_lens or ",".join(str(n) for n in (config.train.seq_length // 2, config.train.seq_length,
                                                         2 * config.train.seq_length))
    _run([sys.executable, "-m", "nsa_parallel.eval", "--run", str(args.out / args.attention),
          "--out", str(args.out / args.attention / "eval"), "--seq-lens", lengths, "--depths", args.depths,
          "--samples", args.samples])


if __name__ == "__main__":
    main()
