"""Adapters through PEFT: LoRA on every linear layer by default."""

from __future__ import annotations

from typing import Any

from launcher.errors import Problem, UserError
from launcher.recipe.schema import AdapterCfg
from launcher.train.tasks import Task


def apply_adapter(model: Any, cfg: AdapterCfg, task: Task, quantized: bool) -> Any:
    """Wrap `model` for `cfg.type`; full fine-tuning returns it unchanged."""
    if cfg.type == "full":
        return model
    from peft import LoraConfig, get_peft_model

    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        modules_to_save=cfg.modules_to_save,  # SEQ_CLS adds the new head by itself
        task_type=task.peft_task_type,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules that the model does not have
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"}
        )
        raise UserError(
            Problem(
                f"cannot apply LoRA to target_modules {cfg.target_modules!r}: {e}",
                key="adapter.target_modules",
                hint=f"this model's linear layers: {', '.join(names[:20])} (or use all-linear)",
            )
        ) from None
