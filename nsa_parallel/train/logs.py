"""Readable training logs: nsa-train's INFO lines without the import-time chatter of megatron-core and torch."""
from __future__ import annotations

import logging
import os
import warnings

# Said at import by megatron-core and torch on machines without Transformer Engine or apex, in every
# worker and checkpoint-writer process. Passed on to child processes through PYTHONWARNINGS, whose
# message fields match the start of a warning.
QUIET_WARNINGS = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),
    ("`load_state_dict` is deprecated", FutureWarning),
    ("Please use DTensor instead", FutureWarning),
)
# Megatron's FSDP package logs at import which backend it would use (nsa-train does not use FSDP);
# its indexed dataset reader logs every step of opening a corpus.
QUIET_LOGGERS = ("megatron.core.distributed.fsdp", "megatron.core.datasets.indexed_dataset")


def quiet_libraries() -> None:
    """In every process that trains: our INFO lines on, the known noise off (also for child processes)."""
    logging.getLogger("nsa_parallel").setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    inherited = [f"ignore:{message}:{category.__name__}" for message, category in QUIET_WARNINGS]
    os.environ["PYTHONWARNINGS"] = ",".join(dict.fromkeys(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                                         *inherited])))


def configure_console() -> None:
    """For the nsa-train process itself: timestamped lines on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
