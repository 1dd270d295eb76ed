"""Evaluation: the eval loss and the task's metrics over the whole eval set, gathered
exactly across processes (accelerate's `gather_for_metrics` drops the samples repeated to
even out the last batch), plus generated text where the task scores it (BLEU, chrF)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from launcher import compat
from launcher.train.tasks import EvalContext, Task


@dataclass
class Evaluator:
    acc: Any  # the run's Accelerator
    objective: Any  # launcher.objectives.Objective
    task: Task
    tokenizer: Any
    label_names: list[str] | None
    loader: Any  # the prepared eval DataLoader
    generation: Any  # launcher.recipe.schema.GenerationCfg
    max_target_length: int
    deepspeed: bool  # no inference tensors: ZeRO-3 would keep some for the next backward
    sharded: bool  # ZeRO-3/FSDP: every rank runs the same number of forwards in generate

    def __call__(self, model: Any, step: int) -> dict[str, Any]:
        """One eval record: {kind, step, eval_loss, <metrics>, eval_seconds}."""
        import torch

        model.eval()
        sums, counts, preds, labels = [], [], [], []
        started = time.time()
        with torch.no_grad() if self.deepspeed else torch.inference_mode():
            for batch in self.loader:
                loss_sum, count, pred = self.objective.eval_batch(model, batch)
                if self.task.generates:
                    pred = self.generate(model, batch)
                sums.append(self.acc.gather_for_metrics(loss_sum.double()).cpu())
                counts.append(self.acc.gather_for_metrics(count.double()).cpu())
                if pred is not None:
                    preds.append(self.gather(pred))
                    labels.append(self.gather(batch["labels"]))
        loss = float(torch.cat(sums).sum() / torch.cat(counts).sum())
        rec: dict[str, Any] = {"kind": "eval", "step": step, "eval_loss": loss}
        ctx = EvalContext(tokenizer=self.tokenizer, label_names=self.label_names)
        rec.update(self.task.eval_metrics(preds, labels, loss, ctx))
        rec["eval_seconds"] = round(time.time() - started, 3)
        compat.assert_4bit_weights_as_trained(model)
        model.train()
        return rec

    def gather(self, x: Any) -> Any:
        """Gather one eval batch from every process; rows of tokens differ in length across
        processes, so they are padded (with -100, which metrics skip) first."""
        if x.ndim == 2 and self.acc.num_processes > 1:
            x = self.acc.pad_across_processes(x, dim=1, pad_index=-100)
        return self.acc.gather_for_metrics(x).cpu()

    def generate(self, model: Any, batch: dict[str, Any]) -> Any:
        """Generated target ids for BLEU and chrF; padding after EOS reads as -100."""
        g = self.generation
        out = self.acc.unwrap_model(model).generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=g.max_new_tokens or self.max_target_length,
            num_beams=g.num_beams,
            do_sample=False,
            synced_gpus=self.sharded and self.acc.num_processes > 1,
        )
        pad = self.tokenizer.pad_token_id
        return out.masked_fill(out == pad, -100) if pad is not None else out


def shown(rec: dict[str, Any]) -> str:
    """An eval record as one line for the terminal."""
    return ", ".join(
        f"{k}={v:.4f}" for k, v in rec.items() if k not in ("kind", "step", "eval_seconds")
    )
