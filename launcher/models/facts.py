"""The facts `launcher.dist.estimate` computes from, read off a recipe's model without
loading any weight: its config, then the model built on torch's meta device (exact
parameter counts, LoRA included). Model code, so it lives with the models.
"""

from __future__ import annotations

from typing import Any

from launcher.dist.estimate import ModelFacts
from launcher.errors import Problem, UserError


def facts_from_recipe(recipe: Any, model_config: str | None = None) -> ModelFacts:
    """Count the recipe's model on the meta device: its config only, never its weights.

    `model_config` (a config.json or its folder) replaces `model.name_or_path`. Nothing is
    downloaded: a hub id is read from the local Hugging Face cache or not at all.
    """
    from pathlib import Path

    import torch
    import transformers

    from launcher.models.adapters import apply_adapter
    from launcher.models.build import model_location
    from launcher.train.tasks import TASKS

    cfg = recipe.model
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if model_config is not None:
        where = Path(model_config).expanduser()
        if where.is_file():
            where = where.parent if where.name == "config.json" else where
        key, hint = None, "a config.json file or the folder holding it"
        if not (where / "config.json").is_file():
            raise UserError(Problem(f"no config.json at {model_config}", hint=hint))
    else:
        where = model_location(cfg)
        key = "model.name_or_path"
        hint = (
            "the model is not on this machine; estimate from its config with "
            "--model-config path/to/config.json, or from numbers with "
            "--params 8e9 --layers 32 --hidden 4096 --vocab 128256"
        )
        if cfg.gguf_file:
            kw["gguf_file"] = cfg.gguf_file
    try:
        config = transformers.AutoConfig.from_pretrained(str(where), local_files_only=True, **kw)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            Problem(f"cannot read the model config of {where}: {first}", key=key, hint=hint)
        ) from None
    task = TASKS[recipe.task]
    if task.uses_labels:
        labels = recipe.data.labels or ["a", "b"]
        config.num_labels = len(labels)
    elif task.label_kind == "score":
        config.num_labels = 1
    build_kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        build_kw["attn_implementation"] = cfg.attn_implementation
    auto = getattr(transformers, task.auto_class)
    with torch.device("meta"):
        model = auto.from_config(config, **build_kw)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks = _blocks(model, getattr(text, "num_hidden_layers", None))
    hidden = _first(text, "hidden_size", "d_model", "n_embd", "dim")
    intermediate = _first(text, "intermediate_size", "n_inner", "ffn_dim", "d_ff") or 4 * hidden
    lin = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    gated = sum(1 for m in lin if (m.in_features, m.out_features) == (hidden, intermediate)) >= 2
    backbone = getattr(model, model.base_model_prefix, model)
    quantizable = sum(
        m.weight.numel() for m in backbone.modules() if isinstance(m, torch.nn.Linear)
    )
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    block_params = sum(p.numel() for p in blocks[0].parameters())
    model = apply_adapter(model, recipe.adapter, task, quantized=False)
    lora_inputs = sum(
        m.in_features
        for m in _blocks(model, len(blocks))[0].modules()
        if hasattr(m, "lora_A") and hasattr(m, "in_features")
    )
    dropout = [
        getattr(text, k, 0) or 0 for k in ("attention_probs_dropout_prob", "attention_dropout")
    ]
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=len(blocks),
        hidden=hidden,
        heads=_first(text, "num_attention_heads", "n_head", "num_heads") or 1,
        vocab=getattr(text, "vocab_size", 0) or 0,
        intermediate=intermediate,
        gated_mlp=gated,
        largest_layer=largest,
        block_params=block_params,
        quantizable=quantizable,
        lora_inputs=lora_inputs,
        attention=getattr(model.config, "_attn_implementation", None) or "sdpa",
        attn_dropout=any(float(d) > 0 for d in dropout),
        hidden_dropout=float(getattr(text, "hidden_dropout_prob", 0) or 0) > 0,
        source=str(where),
    )


def _first(config: Any, *names: str) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None)), None)


def _blocks(model: Any, count: int | None) -> Any:
    """The model's transformer blocks: its longest ModuleList (of `count` if known)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    exact = [m for m in lists if count is not None and len(m) == count]
    if not (exact or lists):
        raise UserError(Problem(f"cannot find the transformer blocks of {type(model).__name__}"))
    return max(exact or lists, key=len)
