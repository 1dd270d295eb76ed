"""The run's state: what a checkpoint must carry besides accelerate's (model, optimizer,
scheduler, RNG) for a resumed run to log what an uninterrupted one would.

Saved as `trainer_state.json`, flat, with the same keys since the first release, so a
checkpoint of any earlier ftl resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Window:
    """What the optimizer steps since the last train log line added up to."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    stats: dict[str, float] = field(default_factory=dict)  # objective statistics, summed

    def add_step(self, loss: float, stats: dict[str, float]) -> None:
        self.loss += loss
        self.steps += 1
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0.0) + v

    def clear(self) -> None:
        self.loss, self.steps, self.tokens, self.samples, self.stats = 0.0, 0, 0, 0, {}


@dataclass
class Best:
    """Early stopping's memory: the best value of the watched metric, where, and how many
    evals since have not beaten it."""

    value: float | None = None
    step: int | None = None
    bad_evals: int = 0


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # real (non-padding) tokens trained on, all ranks
    samples: int = 0
    best: Best = field(default_factory=Best)
    window: Window = field(default_factory=Window)
    run: dict[str, Any] = field(default_factory=dict)  # rundir.run_identity: what resumes

    def to_json(self) -> dict[str, Any]:
        w = self.window
        return {
            "step": self.step,
            "tokens": self.tokens,
            "samples": self.samples,
            "best": self.best.value,
            "best_step": self.best.step,
            "bad_evals": self.best.bad_evals,
            "window_loss": w.loss,
            "window_steps": w.steps,
            "window_tokens": w.tokens,
            "window_samples": w.samples,
            "window_stats": dict(w.stats),
            "run": self.run,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            step=d["step"],
            tokens=d["tokens"],
            samples=d["samples"],
            best=Best(d["best"], d["best_step"], d["bad_evals"]),
            window=Window(
                d["window_loss"],
                d["window_steps"],
                d["window_tokens"],
                d["window_samples"],
                dict(d.get("window_stats", {})),  # absent from checkpoints before objectives
            ),
            run=d.get("run", {}),  # absent from the oldest checkpoints
        )
