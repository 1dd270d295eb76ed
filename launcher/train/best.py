"""Early stopping and the best evaluated model.

`EarlyStopping.watch` decides, after each eval, whether the watched metric improved and
whether to stop; its memory (`state.Best`) is checkpointed with the run. `BestModel`
keeps RUN/best (with `early_stopping.restore_best`): written whole after each improvement,
checked on resume (a later best of an abandoned timeline may have replaced it), and made
RUN/model at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.train.state import Best

BEST = "best"  # the best evaluated model so far (early_stopping.restore_best)
INFO = "best.json"


@dataclass(frozen=True)
class EarlyStopping:
    cfg: Any  # launcher.recipe.schema.EarlyStoppingCfg
    lower_is_better: tuple[str, ...]  # the task's metrics where lower is better

    def watch(self, rec: dict[str, Any], best: Best, *, final: bool) -> tuple[bool, bool]:
        """(improved, stop) after the eval `rec`; updates `best`."""
        es = self.cfg
        value = rec[es.metric]
        lower = es.mode == "min" or (es.mode == "auto" and es.metric in self.lower_is_better)
        if best.value is None:
            improved = True
        elif lower:
            improved = value < best.value - es.min_delta
        else:
            improved = value > best.value + es.min_delta
        if improved:
            best.value, best.step, best.bad_evals = value, rec["step"], 0
        else:
            best.bad_evals += 1
        return improved, not final and best.bad_evals >= es.patience


@dataclass
class BestModel:
    run_dir: Path
    acc: Any  # the run's Accelerator
    # writes the model as a folder, whole, with extra JSON files (every rank calls)
    save_model: Callable[[Path, dict[str, Any]], None]

    @property
    def path(self) -> Path:
        return self.run_dir / BEST

    def save(self, step: int, metric: str, value: float) -> None:
        """Write the model as RUN/best, whole or not at all (every rank calls)."""
        self.save_model(self.path, {INFO: {"step": step, "metric": metric, "value": value}})

    def check_on_resume(self, best: Best) -> None:
        """The best model saved before the checkpoint must still be RUN/best; if not, the
        tracking starts over from the next eval."""
        if best.step is None:
            return
        info = self.path / INFO
        saved = json.loads(info.read_text()).get("step") if info.is_file() else None
        if saved != best.step:
            self.acc.print(
                f"note: the best model of step {best.step} is no longer in {self.path}; "
                "best-model tracking starts over from the next eval"
            )
            best.value, best.step, best.bad_evals = None, None, 0

    def make_final(self, out: Path) -> dict[str, Any] | None:
        """RUN/best becomes `out` (RUN/model); returns what it holds ({step, metric,
        value}), or None when there is no best model (the caller saves the last one)."""
        info = self.path / INFO
        if not info.is_file():
            return None
        restored = json.loads(info.read_text())
        self.acc.wait_for_everyone()  # every rank has read it before it moves
        if self.acc.is_main_process:
            info.unlink()
            atomic.publish(self.path, out)
            self.acc.print(
                f"model/: the best model, step {restored['step']} "
                f"({restored['metric']} {restored['value']:.6g})"
            )
        self.acc.wait_for_everyone()
        return restored
