"""The builders `Trainer` calls, in order, before the first step (torchtune's shape: one
small function per concern, each taking its own part of the typed recipe).

accelerator -> processor -> data (`launcher.data.batches`) -> model -> optimizer ->
schedule. None of them writes to the run folder: a failed check leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError
from launcher.recipe.schema import Recipe
from launcher.train import distributed, report
from launcher.train.tasks import Task

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_trackers(names: list[str]) -> None:
    """Every tracker in `output.report_to` is installed (wandb without a key logs offline)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]
    if missing:
        raise UserError(
            Problem(
                f"report_to names {', '.join(missing)} but it is not installed",
                key="output.report_to",
                hint=" ".join(f"pip install 'ftl[{n}]'" for n in missing),
            )
        )
    if "wandb" in names and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"  # no key: log locally, `wandb sync` later


def make_accelerator(recipe: Recipe, strategy: Any, run_dir: Path) -> Any:
    """The process's Accelerator (host tuned, trackers checked, a previous run's
    accelerate settings in this process forgotten), joined to the planned world."""
    import torch
    from accelerate import Accelerator

    from launcher import compat

    t = recipe.train
    if not torch.cuda.is_available():
        from launcher.train.host import keep_freed_memory

        keep_freed_memory()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    check_trackers(recipe.output.report_to)
    compat.reset_accelerator_state()
    acc = Accelerator(
        mixed_precision="bf16" if t.precision == "bf16" else "no",
        log_with=recipe.output.report_to or None,
        project_dir=str(run_dir / "trackers"),
        kwargs_handlers=distributed.process_group_kwargs(
            strategy, recipe.distributed.timeout_minutes
        ),
    )
    distributed.check_world(acc, strategy)
    return acc


def load_processor(recipe: Recipe, task: Task) -> Any:
    """The tokenizer; for an image model its image processor; for a vision-language model
    its processor. Each is saved with the model."""
    from launcher.models.build import load_image_processor, load_tokenizer

    if task.modality == "vision_language":
        from launcher.models.vlm import check_vision_language, load_processor

        check_vision_language(recipe.model)
        return load_processor(recipe.model)
    if task.modality == "image":
        return load_image_processor(recipe.model)
    return load_tokenizer(recipe.model, needs_eos=task.needs_eos)


@dataclass
class Model:
    """The model ready for `accelerator.prepare`, with what the summary reports of it."""

    model: Any
    l2sp: Any  # launcher.train.regularize.L2SP or None
    quant: dict[str, Any] | None  # what bitsandbytes really did
    dropout_keys: list[str]
    frozen: dict[str, Any] | None  # VLM parts frozen
    reference: Any = None  # a frozen copy of the starting model, when the objective needs one
    rss_mb: dict[str, float] = field(default_factory=dict)


def build(
    recipe: Recipe,
    task: Task,
    labels: list[str] | None,
    tokenizer: Any,
    strategy: Any,
    device_type: str,
    needs_reference: bool = False,
    log: Callable[[str], None] = print,
) -> Model:
    """Model -> fast CPU dropout -> added tokens -> VLM parts frozen -> adapter -> fused LoRA
    -> L2-SP. The order matters: the adapter's own dropouts exist only after the adapter,
    and the fused LoRA layer replaces PEFT's only where it computes the same thing."""
    from accelerate.utils import set_seed

    from launcher.models.adapters import apply_adapter
    from launcher.models.build import (
        build_model,
        check_max_length,
        dropout_settings,
        fit_embeddings,
    )
    from launcher.models.quant import describe_quantization
    from launcher.train.regularize import L2SP, pretrained_parameters

    r, t = recipe, recipe.train
    rss = {"before_model": report.rss_now_mb()}
    dropout_keys = dropout_settings(r.model) if r.model.dropout is not None else []
    set_seed(t.seed)  # before the new head is initialised: runs are reproducible
    model, new_params = build_model(
        r.model,
        r.quant,
        task,
        labels,
        getattr(tokenizer, "pad_token_id", None),
        strategy=strategy,
        precision=t.precision,
    )
    rss["after_model"] = report.rss_now_mb()
    quant = describe_quantization(model)
    if quant:
        log("quantized base: " + ", ".join(f"{k} {v}" for k, v in quant.items()))
    if task.name != "causal_lm":  # encoders have a fixed position table
        check_max_length(model, r.data.max_length)
    if task.label_kind == "target":  # so may the decoder
        check_max_length(model, r.data.max_target_length, "data.max_target_length")
    fast_dropout = t.fast_dropout and device_type == "cpu"
    if fast_dropout:
        from launcher.models.fast_dropout import enable, fuse_lora_dropout, swap_dropout

        enable(model)
    vlm = task.modality == "vision_language"
    text_tok = tokenizer.tokenizer if vlm else tokenizer
    resized = task.modality != "image" and fit_embeddings(model, len(text_tok))  # added tokens
    pretrained = pretrained_parameters(model, new_params) if t.l2sp > 0 else []
    targets, also_save, frozen = None, [], None
    if vlm:
        from launcher.models import vlm as vlm_parts

        frozen = vlm_parts.freeze(
            model, vision=r.model.freeze_vision_tower, projector=r.model.freeze_projector
        )
        if r.adapter.enabled and r.adapter.target_modules == "all-linear":
            targets = vlm_parts.lora_targets(model)  # the language model's layers
        if r.adapter.enabled and not r.model.freeze_projector:
            also_save = vlm_parts.projector_modules(model)
    reference = None
    if needs_reference and not r.adapter.enabled:  # with an adapter: the adapter switched off
        from launcher.objectives import frozen_copy

        reference = frozen_copy(model)
    model = apply_adapter(
        model,
        r.adapter,
        task,
        quantized=r.quant.bits is not None,
        resized_embeddings=resized,
        target_modules=targets,
        also_save=also_save,
    )
    if fast_dropout:
        swap_dropout(model)  # the adapter's own dropouts (lora_dropout), new since enable()
        # ZeRO-3 / FSDP gather weights themselves; no adapter, no PEFT import
        if not strategy.shards_params and r.adapter.enabled:
            from launcher.models.fused_lora import fuse_lora

            fuse_lora(model)  # one pass less per LoRA linear each way, dropout inside
            fuse_lora_dropout(model)  # the rest (QLoRA): no float copies for backward
    l2sp = L2SP(pretrained, t.l2sp) if t.l2sp > 0 else None
    return Model(model, l2sp, quant, dropout_keys, frozen, reference, rss)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and norms are left alone (standard practice)."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(recipe: Recipe, acc: Any, model: Any) -> Any:
    """The recipe's optimizer; under a DeepSpeed config that names its own (ZeRO-Offload:
    DeepSpeedCPUAdam), a placeholder whose hyper-parameters the launch plan filled in."""
    from launcher.train.optim import build_optimizer

    t = recipe.train
    groups = param_groups(model, t.weight_decay)
    if distributed.deepspeed_builds_optimizer(acc):
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=t.lr, weight_decay=t.weight_decay)
    return build_optimizer(
        t.optimizer, groups, lr=t.lr, weight_decay=t.weight_decay, betas=t.betas, eps=t.eps
    )


def start_trackers(acc: Any, recipe: Recipe, run_dir: Path) -> None:
    """TensorBoard / W&B / MLflow through accelerate, their files inside the run folder."""
    if not recipe.output.report_to:
        return
    from launcher.recipe.schema import dump

    trackers = run_dir / "trackers"
    if acc.is_main_process:
        trackers.mkdir(exist_ok=True)
    acc.init_trackers(
        recipe.output.run_name or run_dir.name,
        config=report.flat(dump(recipe)),
        init_kwargs={"wandb": {"dir": str(trackers)}},  # offline files stay in the run
    )


def count_parameters(model: Any) -> tuple[int, int]:
    """(all, trainable) parameters; under ZeRO-3 the full sizes, not this rank's shard."""
    n = sum(distributed.numel(p) for p in model.parameters())
    return n, sum(distributed.numel(p) for p in model.parameters() if p.requires_grad)


def make_lr_schedule(recipe: Recipe, acc: Any, optimizer: Any, sched: Any) -> Any:
    """The LR schedule, stepped once per optimizer step by the loop (accelerate's wrapper
    would step it once per process) and checkpointed alongside the model; built on the
    optimizer that really updates the weights (DeepSpeed's, when it built its own)."""
    from launcher.train.optim import build_scheduler

    schedule = build_scheduler(
        recipe.train.scheduler,
        distributed.torch_optimizer(optimizer),
        sched.warmup_steps,
        sched.total_steps,
    )
    acc.register_for_checkpointing(schedule)
    return schedule
