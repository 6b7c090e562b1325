"""Console progress, shown by rank 0: a tqdm bar on a terminal, else a log line every ``log_interval`` steps."""
from __future__ import annotations

import datetime
import logging
import sys
import time

log = logging.getLogger(__name__)


def _tqdm_bar(start: int, total: int):
    if not sys.stderr.isatty():  # e.g. Ray workers, whose output the driver relays line by line
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(initial=start, total=total, unit="step", dynamic_ncols=True)


class Progress:
    def __init__(self, start_step: int, max_steps: int, log_interval: int, tokens_per_step: int):
        self.max_steps, self.log_interval, self.tokens_per_step = max_steps, log_interval, tokens_per_step
        self.bar = _tqdm_bar(start_step, max_steps)
        self.window_start, self.window_steps, self.window_seconds = time.perf_counter(), 0, 0.0

    def update(self, step: int, loss: float, lr: float, grad_norm: float) -> float:
        """Reports finished step ``step``; returns the tokens/s over the steps since the last report."""
        self.window_steps += 1
        now = time.perf_counter()
        self.window_seconds = now - self.window_start
        seconds_per_step = self.window_seconds / self.window_steps
        tokens_per_s = self.tokens_per_step / seconds_per_step
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(1)
        if step % self.log_interval == 0 or step == self.max_steps:
            eta = datetime.timedelta(seconds=round(seconds_per_step * (self.max_steps - step)))
            message = (f"step {step}/{self.max_steps}  loss {loss:.4f}  lr {lr:.2e}  grad norm {grad_norm:.3f}  "
                       f"{tokens_per_s:,.0f} tokens/s  eta {eta}")
            if self.bar is not None:
                self.bar.write(message)
            else:
                log.info(message)
            self.window_start, self.window_steps, self.window_seconds = now, 0, 0.0
        return tokens_per_s

    def restart_clock(self) -> None:
        """Leaves the time since the last step (e.g. a checkpoint) out of the tokens/s."""
        self.window_start = time.perf_counter() - self.window_seconds

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
