"""Objectives: what the loop optimises.

The loop (`launcher/train/loop.py`) does not know what it trains. For every micro-batch it
asks the run's objective for a `Loss`: the value to back-propagate (the mean over the
micro-batch's targets) and statistics to log beside it (rewards, margins, KL...). For an
eval batch it asks for summed losses, their counts and predictions, so metrics gather
exactly across processes. Everything else (accumulation, clipping, the optimizer step,
logging, evals, checkpoints, resume, stopping) is the loop's and the same for every
objective.

An objective declares what it `Needs` and the loop provides it before training starts:
- `reference_model`: a frozen copy of the starting model (DPO-style losses, a KL penalty):
  the adapter switched off when one is trained, else a frozen copy;
- `generation`: it samples from the policy while training (online RL: sample, score,
  update inside `loss`), so the model must generate and its tokenizer define EOS;
- `formats`: the data formats it can read (empty: whatever the task takes).

Today's next-token and classification losses are the `supervised` objective
(`objectives/supervised.py`). A new objective is a class with `needs`, `bind`, `loss`
and `eval_batch`, registered in `OBJECTIVES`; `Trainer(recipe, objective=...)` also takes
one directly (tests/test_objectives.py trains a pairwise preference loss and an online
sample-score-update loss that way, without a change to the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Needs:
    reference_model: bool = False
    generation: bool = False
    formats: tuple[str, ...] = ()


@dataclass
class Loss:
    value: Any  # scalar tensor with grad: the mean over this micro-batch's targets
    stats: dict[str, Any] = field(default_factory=dict)  # scalar tensors, logged as means


@dataclass
class Context:
    """What an objective may use, handed over once the model is prepared."""

    recipe: Any  # launcher.recipe.schema.Recipe
    task: Any  # launcher.train.tasks.Task
    tokenizer: Any  # tokenizer, image processor or processor
    accelerator: Any
    model: Any  # the prepared model (wrapped by DDP/DeepSpeed/FSDP where they apply)
    reference: Callable[..., Any] | None = None  # reference(**inputs) -> outputs, no grad


class Objective(Protocol):
    name: str
    needs: Needs

    def bind(self, ctx: Context) -> None:
        """Called once before the first step (and after a resume)."""

    def loss(self, model: Any, batch: dict[str, Any]) -> Loss:
        """The training loss of one micro-batch."""

    def eval_batch(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Per-example (loss sum, loss count, prediction or None) of one eval batch."""


def supervised(recipe: Any, task: Any) -> Objective:
    from launcher.objectives.supervised import Supervised

    return Supervised(task, recipe.train.label_smoothing)


# name -> builder(recipe, task); the task's own loss is "supervised"
OBJECTIVES: dict[str, Callable[[Any, Any], Objective]] = {"supervised": supervised}


class Reference:
    """The starting model, frozen, for objectives that need one: with an adapter, the
    trained model with its adapter switched off (PEFT's `disable_adapter`: no second copy
    of the weights); otherwise a frozen copy taken before training."""

    def __init__(self, accelerator: Any, model: Any, frozen_copy: Any | None) -> None:
        self.acc, self.model, self.copy = accelerator, model, frozen_copy

    def __call__(self, **inputs: Any) -> Any:
        import torch

        with torch.no_grad():
            if self.copy is not None:
                return self.copy(**inputs)
            with self.acc.unwrap_model(self.model).disable_adapter():
                return self.model(**inputs)


def frozen_copy(model: Any) -> Any:
    """A frozen eval-mode copy of `model` (the reference of a full fine-tune)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def check_needs(objective: Objective, recipe: Any, strategy: Any, tokenizer: Any) -> None:
    """Refuse, before anything is written, a run that cannot give `objective` what it
    needs (exit code 2, the key to change named)."""
    from launcher.errors import Problem, UserError

    needs, name = objective.needs, objective.name
    problems = []
    if needs.formats and recipe.data.format not in needs.formats:
        problems.append(
            Problem(
                f"objective {name} reads {', '.join(needs.formats)} data, not {recipe.data.format}",
                key="data.format",
                hint=f"set data.format to one of: {', '.join(needs.formats)}",
            )
        )
    if needs.reference_model and strategy.shards_params and not recipe.adapter.enabled:
        problems.append(
            Problem(
                f"objective {name} needs a frozen reference model, which ftl keeps whole on "
                f"every process: not under {strategy.name}, which shards the weights",
                key="distributed.strategy",
                hint="train an adapter (adapter.type: lora), whose reference is the base with "
                "the adapter switched off, or use ddp / zero1 / zero2",
            )
        )
    text = getattr(tokenizer, "tokenizer", tokenizer)
    if needs.generation and getattr(text, "eos_token_id", None) is None:
        problems.append(
            Problem(
                f"objective {name} samples text, but the tokenizer defines no EOS token",
                key="model.name_or_path",
                hint="use a tokenizer with an eos_token",
            )
        )
    if problems:
        raise UserError(problems)
