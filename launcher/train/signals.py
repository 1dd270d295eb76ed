"""SIGTERM / SIGUSR1 / SIGINT -> a stop flag the loop reads at step boundaries.

The loop then saves a complete checkpoint and exits; `--resume auto` carries on from it.
Under several processes every rank must agree, so the flag is all-reduced (max).
`STOP` is the process's one flag: `ftl train` installs it first thing, so a signal that
arrives while libraries import or the model loads is kept, not lost.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        if self._previous:  # already installed
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self.signal = None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now
        self.signal = signum

    def should_stop(self, accelerator: Any) -> bool:
        """True on every rank as soon as any rank got a signal."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        import torch

        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item() > 0)


STOP = StopFlag()
