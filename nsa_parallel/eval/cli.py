"""``nsa-eval --run DIR [--run DIR ...] --out DIR``: scores trained runs on the quality tasks.

For each run (a ``train.output_dir`` that ``nsa-train`` wrote) it loads the latest checkpoint
with the config saved beside it, then scores, on text training never saw: the held-out loss
(bits per byte on a byte corpus) at the training length, and passkey and MQAR accuracy for every
context length in ``--seq-lens`` and depth in ``--depths`` (exact match under teacher forcing).
It writes ``eval.json`` and PNGs: a heat map per task (one panel per run) and the runs' training
loss curves. ``--merge A/eval.json B/eval.json`` combines evaluations made apart (e.g. one per
GPU job) into one ``eval.json`` and its plots, evaluating nothing. Every run directory, checkpoint
and config is checked before any model is built: a problem is an error naming the file (exit 2).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path

import torch

from ..train.logs import configure_console
from .errors import RunError

log = logging.getLogger("nsa_parallel.eval")
TASKS = ("lm", "passkey", "mqar")


def _numbers(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-eval", description="Scores nsa-train runs on held-out loss, passkey "
                                "retrieval and MQAR by context length and depth.")
    p.add_argument("--run", type=Path, action="append", default=[], help="a run directory (repeatable)")
    p.add_argument("--merge", type=Path, nargs="+", default=[], help="eval.json files to combine instead")
    p.add_argument("--out", type=Path, required=True, help="where eval.json and the PNGs go")
    p.add_argument("--seq-lens", type=_numbers(int), help="context lengths (default: the first run's training "
                   "length, half and twice it)")
    p.add_argument("--depths", type=_numbers(float), default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="where the answer sits, 0 (start) to 1 (end) (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, default=8, help="samples per length and depth (MQAR: per length)")
    p.add_argument("--lm-samples", type=int, default=8, help="held-out windows for the loss")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS), help="lm,passkey,mqar")
    p.add_argument("--step", type=int, help="evaluate each run's checkpoint of this step (default: its latest), "
                   "so that runs of different speeds are compared at equal tokens")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--corpus", help="the corpus prefix, where it is not the runs' data.path any more")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.run) == bool(args.merge):
        raise RunError("give --run DIR (one or more) or --merge FILE..., not both or neither")
    unknown = set(args.tasks) - set(TASKS)
    if unknown:
        raise RunError(f"--tasks: unknown {sorted(unknown)}; the tasks are {TASKS}")
    if any(n <= 0 for n in args.seq_lens or []) or not all(0 <= d <= 1 for d in args.depths):
        raise RunError("--seq-lens must be positive and --depths in [0, 1]")
    if args.step is not None and args.step <= 0:
        raise RunError(f"--step must be a positive training step, not {args.step}")
    if args.samples <= 0 or args.lm_samples <= 0:
        raise RunError("--samples and --lm-samples must be positive")
    names = [run.resolve().name for run in args.run]
    if len(set(names)) != len(names):
        raise RunError(f"--run directories must have different names (they label the results): {names}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible")


def _prepare(args: argparse.Namespace) -> dict[str, tuple]:
    """Every run's directory, checkpoint, config, corpus and tasks, checked before any model is built."""
    from ..train.tasks import Corpus, corpus_tasks
    from .run import prepare_run

    wanted = tuple(task for task in TASKS if task in args.tasks)
    prepared = {}
    for run in (r.resolve() for r in args.run):
        checkpoint, config = prepare_run(run, corpus=args.corpus, step=args.step)
        try:
            tasks = corpus_tasks(Corpus(config.data.path), config.model.vocab_size, config.data.num_pairs, wanted)
        except ValueError as err:
            raise RunError(f"{checkpoint}/job.yaml: {err}") from None
        shortest = max(task.min_seq_length() for task in tasks.values())
        if args.seq_lens and min(args.seq_lens) < shortest:
            raise RunError(f"--seq-lens: {min(args.seq_lens)} is shorter than the {shortest} tokens {wanted} need")
        prepared[run.name] = (run, checkpoint, config, tasks)
    return prepared


def _evaluate(args: argparse.Namespace) -> dict:
    from megatron.core import parallel_state

    from ..train.model import init_model_parallel
    from ..train.single_process import process_group
    from .run import load_model
    from .score import EVAL_SEED

    prepared = _prepare(args)
    first = next(iter(prepared.values()))[2]
    seq_lens = args.seq_lens or [first.train.seq_length // 2, first.train.seq_length, 2 * first.train.seq_length]
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    results = {}
    with process_group(device):
        init_model_parallel(first, device)
        try:
            for name, (run, checkpoint, config, tasks) in prepared.items():
                log.info("%s: %s (%s attention)", name, checkpoint, config.model.attention)
                model = load_model(checkpoint, config, device, max(seq_lens))
                results[name] = _score(args, run, checkpoint, config, model, tasks, seq_lens, device)
                del model
        finally:
            parallel_state.destroy_model_parallel()
    context = {"device": torch.cuda.get_device_name() if use_cuda else "cpu", "torch": torch.__version__,
               "date": datetime.date.today().isoformat(), "command": " ".join(["nsa-eval", *sys.argv[1:]])}
    for result in results.values():  # each run keeps how it was scored through --merge
        result["evaluated"] = context
    return {"runs": results, "seq_lens": seq_lens, "depths": args.depths, "samples": args.samples,
            "eval_seed": EVAL_SEED, **context}


def _score(args, run: Path, checkpoint: Path, config, model, tasks: dict, seq_lens: list[int],
           device: torch.device) -> dict:
    from ..train.checkpoint import load_common
    from .report import training_record
    from .score import heldout_bits_per_token, mqar_accuracy, passkey_accuracy

    t = config.train
    step = int(load_common(checkpoint)["step"])
    result = {"run": str(run), "checkpoint": str(checkpoint), "step": step, "attention": config.model.attention,
              "parameters": sum(p.numel() for p in model.parameters()), "trained_seq_length": t.seq_length,
              "tokens_per_step": t.global_batch_size * t.seq_length,
              "trained_tokens": step * t.global_batch_size * t.seq_length,
              "model": vars(config.model), "nsa": vars(config.nsa) if config.model.attention == "nsa" else None,
              "data": {"path": config.data.path, "mix": dict(config.data.mix), "num_pairs": config.data.num_pairs},
              "seed": t.seed, "training": training_record(run)}
    if "lm" in args.tasks:
        bits = heldout_bits_per_token(model, tasks["lm"], t.seq_length, args.lm_samples, device)
        log.info("%s: held-out loss %.4f bits per token at %d tokens", run.name, bits, t.seq_length)
        result["heldout"] = {"seq_length": t.seq_length, "samples": args.lm_samples, "bits_per_token": bits}
    if "passkey" in args.tasks:
        nsa = config.nsa.select_block_size if config.model.attention == "nsa" else None
        accuracy, digits, chosen = passkey_accuracy(model, tasks["passkey"], seq_lens, args.depths, args.samples,
                                                    device, nsa)
        result["passkey"] = {"samples": args.samples, "chance": 10.0 ** -tasks["passkey"].DIGITS,
                             "accuracy": accuracy, "answer_tokens": digits}
        if chosen is not None:
            result["passkey"]["needle_chosen_by_layer"] = chosen
    if "mqar" in args.tasks:
        accuracy, queries, values = mqar_accuracy(model, tasks["mqar"], seq_lens, args.depths, args.samples,
                                                  device)
        result["mqar"] = {"samples": args.samples, "chance": 1 / tasks["mqar"].num_ids, "accuracy": accuracy,
                          "queries": queries, "answer_tokens": values}
    return result


def _merge(files: list[Path]) -> dict:
    merged: dict = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunError(f"--merge {path}: {err}") from None
        overlap = set(merged.get("runs", {})) & set(data.get("runs", {}))
        if overlap:
            raise RunError(f"--merge {path}: runs {sorted(overlap)} appear in more than one file")
        merged = {**data, **merged, "runs": {**merged.get("runs", {}), **data["runs"]}}
    return merged


def write_outputs(result: dict, out: Path) -> list[Path]:
    from . import plots, report

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json", out / "summary.md"]
    written[0].write_text(json.dumps(result, indent=1) + "\n")
    written[1].write_text(report.markdown(result) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # e.g. a bare GPU image: `nsa-eval --merge` draws them later where it is installed
        log.warning("matplotlib is not installed: no PNGs (eval.json and summary.md are written)")
        return written
    for task in ("passkey", "mqar"):
        if any(task in r for r in result["runs"].values()):
            written.append(plots.heat_maps(result["runs"], task, out / f"{task}.png"))
    written.append(plots.loss_curves(result["runs"], out / "loss_curves.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_console()
    try:
        _check_args(args)
        result = _merge(args.merge) if args.merge else _evaluate(args)
    except RunError as err:
        print(f"nsa-eval: error: {err}", file=sys.stderr)
        return 2
    for path in write_outputs(result, args.out):
        print(f"wrote {path}")
    return 0
