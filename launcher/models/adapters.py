"""Adapters through PEFT: LoRA on every linear layer by default."""

from __future__ import annotations

from typing import Any

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
    return get_peft_model(model, config)
