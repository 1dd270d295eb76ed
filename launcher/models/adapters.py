"""Adapters through PEFT: LoRA, DoRA and rsLoRA, on every linear layer by default."""

from __future__ import annotations

import re
from typing import Any

from launcher.errors import Problem, UserError
from launcher.recipe.schema import AdapterCfg
from launcher.train.tasks import Task


def apply_adapter(
    model: Any,
    cfg: AdapterCfg,
    task: Task,
    quantized: bool,
    *,
    resized_embeddings: bool = False,
    target_modules: Any = None,
    also_save: list[str] | tuple[str, ...] = (),
) -> Any:
    """Wrap `model` for `cfg.type`; full fine-tuning returns it unchanged.

    `resized_embeddings`: the vocabulary grew (added tokens), so the new rows must be
    trained and saved with the adapter: the input embeddings and the output head join
    `modules_to_save` (tied ones stay tied), and loading, merging and serving then see
    the same vocabulary as training.

    `target_modules` replaces the recipe's default (a vision-language model: its language
    model's layers only); `also_save` are modules trained in full beside the adapter (a
    VLM's projector).
    """
    if not cfg.enabled:
        return model
    from launcher import compat

    compat.import_peft()
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules if target_modules is None else target_modules
    _check_targets(model, targets)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # norms and embeddings in fp32. Checkpointing is already on when asked for
        # (build_model, non-reentrant: no input-grad hook needed), so PEFT does not
        # enable it a second time through transformers' deprecated name.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    to_save = list(cfg.modules_to_save or [])
    to_save += [m for m in (*task.head_modules, *also_save) if m not in to_save]
    tied = False
    if resized_embeddings:
        names = embedding_modules(model)
        to_save += [n for n in names if n not in to_save]
        tied = bool(getattr(model.config, "tie_word_embeddings", False)) and len(names) == 2
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=to_save or None,  # SEQ_CLS adds the new head by itself
        use_dora=cfg.type == "dora",
        use_rslora=cfg.rslora,
        ensure_weight_tying=tied,
        task_type=task.peft_task_type or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a module type that LoRA cannot wrap
        raise UserError(
            Problem(
                f"cannot apply {cfg.type} to target_modules {cfg.target_modules!r}: {e}",
                key="adapter.target_modules",
                hint=f"this model's linear layers: {', '.join(linear_names(model)[:24])} "
                "(or use all-linear)",
            )
        ) from None


def linear_names(model: Any) -> list[str]:
    """Short names of the model's linear layers (plain, 4-bit and 8-bit ones), sorted."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m) and n})


def embedding_modules(model: Any) -> list[str]:
    """Short names of the input embeddings and the output head (`embed_tokens`, `lm_head`)."""
    wanted = [model.get_input_embeddings()]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        wanted.append(out_emb)
    names = []
    for module in wanted:
        for n, m in model.named_modules():
            if m is module:
                names.append(n.rsplit(".", 1)[-1])
                break
    return names


def is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ in (
        "Linear4bit",
        "Linear8bitLt",
    )


def _check_targets(model: Any, target: list[str] | str) -> None:
    """Refuse target_modules that match no layer, naming the ones that exist.

    PEFT matches a list entry against the end of each module path and a string as a
    regex against the whole path; "all-linear" always matches.
    """
    if target == "all-linear":
        return
    paths = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise UserError(
                Problem(
                    f"target_modules is not a valid regex: {e}",
                    key="adapter.target_modules",
                    hint="a list of layer names, a regex over module paths, or all-linear",
                )
            ) from None
        what = "" if any(pattern.fullmatch(p) for p in paths) else f"the regex {target}"
    else:
        missing = [t for t in target if not any(p == t or p.endswith("." + t) for p in paths)]
        what = ", ".join(missing)
    if what:
        raise UserError(
            Problem(
                f"{what} matches no module of this model",
                key="adapter.target_modules",
                hint=f"this model's linear layers: {', '.join(linear_names(model)[:24])} "
                "(or all-linear; a regex is matched against full paths such as "
                f"{_example_path(model)})",
            )
        )


def _example_path(model: Any) -> str:
    for n, m in model.named_modules():
        if is_linear(m) and n:
            return n
    return "model.layers.0.self_attn.q_proj"
