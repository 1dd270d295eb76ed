"""Task -> model: tokenizer and model loading, new heads, dtype, attention implementation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.assets import resolve_path
from launcher.dist.strategies import STRATEGIES, Strategy
from launcher.errors import Problem, UserError
from launcher.recipe.schema import ModelCfg, QuantCfg
from launcher.train.tasks import Task


def model_location(cfg: ModelCfg) -> str:
    """Local directory for `pkg:`/path values, the hub id otherwise."""
    value = cfg.name_or_path
    if value.startswith("pkg:") or value.startswith((".", "/", "~")) or Path(value).exists():
        path = resolve_path(value, base=Path.cwd())
        if not path.exists():
            raise UserError(
                Problem(
                    f"model not found: {path}",
                    key="model.name_or_path",
                    hint="a local directory, pkg:<package>/<path>, or a hub id",
                )
            )
        if cfg.gguf_file and not (path / cfg.gguf_file).is_file():
            raise UserError(
                Problem(f"GGUF file not found: {path / cfg.gguf_file}", key="model.gguf_file")
            )
        return str(path)
    return value


def load_kwargs(cfg: ModelCfg) -> dict[str, Any]:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kw["gguf_file"] = cfg.gguf_file
    return kw


def load_tokenizer(cfg: ModelCfg, *, needs_eos: bool = False) -> Any:
    """The model's tokenizer, with a pad token (EOS if it has none: labels mask by position)."""
    from transformers import AutoTokenizer

    where = (
        str(resolve_path(cfg.tokenizer, base=Path.cwd())) if cfg.tokenizer else model_location(cfg)
    )
    try:
        tok = AutoTokenizer.from_pretrained(where, **load_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(
                f"cannot load the tokenizer from {where}: {e}",
                key="model.name_or_path",
                hint="offline: use a local directory or a pkg: path",
            )
        ) from None
    if needs_eos and tok.eos_token_id is None:
        raise UserError(
            Problem(
                f"the tokenizer at {where} has no EOS token: a language model could not learn to stop",
                key="model.tokenizer",
                hint="use a tokenizer that defines eos_token",
            )
        )
    if cfg.add_tokens:
        tok.add_tokens(list(cfg.add_tokens), special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_image_processor(cfg: ModelCfg) -> Any:
    """The model's image processor (resize, rescale, normalise), in place of a tokenizer."""
    from transformers import AutoImageProcessor

    where = model_location(cfg)
    try:
        return AutoImageProcessor.from_pretrained(where, **load_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(
                f"cannot load the image processor from {where}: {e}",
                key="model.name_or_path",
                hint="the model folder needs its preprocessor_config.json",
            )
        ) from None


def fit_embeddings(model: Any, n_tokens: int) -> bool:
    """Grow the embeddings (and a tied or untied head) to `n_tokens`; True if they grew.

    New rows start at the mean of the old ones (transformers' mean resizing), so a new
    token begins as an average token rather than noise.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or n_tokens <= emb.num_embeddings:
        return False
    model.resize_token_embeddings(n_tokens, mean_resizing=True)
    return True


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_model(
    cfg: ModelCfg,
    quant: QuantCfg,
    task: Task,
    labels: list[str] | None,
    pad_token_id: int | None,
    *,
    strategy: Strategy = STRATEGIES["none"],
    precision: str = "fp32",
) -> tuple[Any, set[str]]:
    """Load the pretrained model for `task`; returns it and the names of new parameters.

    Under a strategy that shards the weights (ZeRO-3, FSDP2) quantized weights are stored
    in the float dtype of `precision` (see `quant.storage_dtype`).
    """
    import transformers

    auto = getattr(transformers, task.auto_class)
    kw = load_kwargs(cfg)
    kw["dtype"] = _torch_dtype(cfg.dtype)
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    if task.uses_labels:
        kw.update(
            num_labels=len(labels or []),
            id2label=dict(enumerate(labels or [])),
            label2id={n: i for i, n in enumerate(labels or [])},
        )
    elif task.label_kind == "score":
        kw.update(num_labels=1, id2label={0: "score"}, label2id={"score": 0})
    if task.problem_type:
        kw["problem_type"] = task.problem_type  # picks the head's loss: CE, BCE or MSE
    if task.uses_labels or task.label_kind == "score":
        # a checkpoint with a head of another size (ImageNet's 1000 classes, another
        # label set) gets a new head of the right size instead of a load error
        kw["ignore_mismatched_sizes"] = True
    dropout_keys = dropout_settings(cfg) if cfg.dropout is not None else []
    kw.update(dict.fromkeys(dropout_keys, cfg.dropout))
    if quant.bits is not None:
        from launcher.models.quant import bnb_config, check_compute_dtype, storage_dtype

        check_compute_dtype(quant.compute_dtype)
        storage = storage_dtype(quant, cfg.dtype, precision, strategy.shards_params)
        skip: tuple[str, ...] = ()
        if task.modality == "vision_language":
            from launcher.models.families import PROJECTOR, VISION

            # only the language model is quantized; transformers matches these patterns
            # from the start of a module's path
            skip = tuple(rf"(.*\.)?{name}" for name in VISION + PROJECTOR)
        kw["quantization_config"] = bnb_config(quant, storage, skip)
        if strategy.zero_stage != 3:  # ZeRO-3 refuses a device_map; DeepSpeed places shards
            # each process quantizes on its own device (GPU: fast), FSDP2 shards from there
            kw["device_map"] = {"": _local_device()}
    try:
        model, info = auto.from_pretrained(model_location(cfg), output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(
                f"cannot load the model: {e}",
                key="model.name_or_path",
                hint="offline: use a local directory or a pkg: path",
            )
        ) from None
    if quant.bits is not None:
        from launcher import compat

        compat.keep_4bit_weights_as_trained(model)  # evals must not rewrite them (CPU)
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id  # classification heads find the last token by it
    if cfg.gradient_checkpointing:
        from launcher import compat

        compat.enable_activation_checkpointing(model)
        model.config.use_cache = False
    new = set(info.get("missing_keys", []))
    new |= {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])}
    return model, new


# config keys that hold a dropout probability, across the families transformers ships
DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "classifier_dropout_prob",
    "hidden_dropout",
    "attention_dropout",
    "activation_dropout",
    "dropout",
    "dropout_rate",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "seq_classif_dropout",
    "mlp_dropout",
    "embedding_dropout",
    "ffn_dropout",
)


def dropout_settings(cfg: ModelCfg) -> list[str]:
    """The dropout keys of this model's config that `model.dropout` sets."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_location(cfg), **load_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(f"cannot read the model config: {e}", key="model.name_or_path")
        ) from None
    keys = [k for k in DROPOUT_KEYS if k in config.to_dict()]
    if not keys:
        raise UserError(
            Problem(
                f"model.dropout is set, but the config of {cfg.name_or_path} "
                f"({type(config).__name__}) has none of the dropout keys ftl knows",
                key="model.dropout",
                hint="remove model.dropout; its dropout cannot be overridden from the config",
            )
        )
    return keys


def check_max_length(model: Any, max_length: int, key: str = "data.max_length") -> None:
    """A sequence longer than the model's position table would fail mid-run: say so now."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < max_length:
        raise UserError(
            Problem(
                f"{key}={max_length} but this model has only {limit} positions "
                "(max_position_embeddings)",
                key=key,
                hint=f"set {key}: {limit} or less; longer rows then follow data.too_long",
            )
        )


def _local_device() -> str:
    import torch

    if torch.cuda.is_available():
        import os

        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def save_model(
    model: Any,
    tokenizer: Any,
    out: Path,
    *,
    is_main: bool,
    save_fn: Any,
    state_dict: dict[str, Any] | None,
) -> None:
    """Write the final model (or adapter) as safetensors next to its tokenizer (or processor),
    under the key names of the checkpoint it was loaded from."""
    from launcher import compat

    compat.forget_gguf_quantization(model)  # dequantized on load: plain weights now
    compat.keep_used_weight_renamings(model)
    model.save_pretrained(
        out,
        is_main_process=is_main,
        save_function=save_fn,
        state_dict=state_dict,
        safe_serialization=True,
    )
    if is_main:
        tokenizer.save_pretrained(out)
