"""bitsandbytes 4/8-bit loading (QLoRA)."""

from __future__ import annotations

from typing import Any

from launcher.recipe.schema import QuantCfg


def storage_dtype(cfg: QuantCfg, model_dtype: str, precision: str, shards_params: bool) -> str:
    """The dtype that holds packed 4-bit weights.

    uint8 unless ZeRO-3/FSDP shards the weights. Sharding engines gather, cast and
    flatten parameters by float dtype, so the packed bytes then live in the dtype the
    engine trains in (the same bits, reinterpreted; PEFT #1550's route to QLoRA under
    sharding): bfloat16 with train.precision bf16, which DeepSpeed and FSDP2 cast every
    float parameter to, otherwise the model's dtype.
    """
    if cfg.quant_storage != "auto":
        return cfg.quant_storage
    if not shards_params:
        return "uint8"
    return "bfloat16" if precision == "bf16" else model_dtype


def bnb_config(cfg: QuantCfg, storage: str = "uint8", skip: tuple[str, ...] = ()) -> Any:
    """`BitsAndBytesConfig` for `cfg.bits` (4: NF4/FP4, double quant, storage; 8: LLM.int8).

    `skip`: module names kept in full precision besides the output head (a VLM's vision
    tower and projector: small, and the projector is trained in full)."""
    import torch
    from transformers import BitsAndBytesConfig

    keep = {"llm_int8_skip_modules": ["lm_head", *skip]} if skip else {}
    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **keep)
    return BitsAndBytesConfig(
        **keep,
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, storage),
    )


def check_compute_dtype(name: str, device: str | None = None, bf16_ok: bool | None = None) -> None:
    """Refuse a 4-bit compute dtype the device cannot run (bfloat16 before Ampere).

    bitsandbytes runs float32, bfloat16 and float16 on CPU; on CUDA, bfloat16 needs
    compute capability 8.0. `device`/`bf16_ok` default to what this process sees.
    """
    from launcher import compat
    from launcher.errors import Problem, UserError

    try:
        compat.import_bitsandbytes()
    except ImportError:
        raise UserError(
            Problem(
                "quant.bits needs bitsandbytes, which is not installed",
                key="quant.bits",
                hint="pip install bitsandbytes, or remove quant.bits",
            )
        ) from None
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if bf16_ok is None:
        bf16_ok = device != "cuda" or torch.cuda.is_bf16_supported()
    if name == "bfloat16" and not bf16_ok:
        raise UserError(
            Problem(
                f"quant.compute_dtype bfloat16 is not supported on this {device} device "
                "(CUDA needs compute capability 8.0, Ampere or newer)",
                key="quant.compute_dtype",
                hint="set quant.compute_dtype: float16 (and train.precision: fp32)",
            )
        )


def describe_quantization(model: Any) -> dict[str, Any] | None:
    """What bitsandbytes really did to `model` (None if nothing), for the log and summary."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None or not (getattr(qc, "load_in_4bit", False) or getattr(qc, "load_in_8bit", False)):
        return None
    if qc.load_in_8bit:
        return {"bits": 8}

    def name(dtype: Any) -> str:
        return str(dtype).removeprefix("torch.")

    return {
        "bits": 4,
        "type": qc.bnb_4bit_quant_type,
        "double_quant": qc.bnb_4bit_use_double_quant,
        "compute_dtype": name(qc.bnb_4bit_compute_dtype),
        "storage": name(qc.bnb_4bit_quant_storage),
    }
