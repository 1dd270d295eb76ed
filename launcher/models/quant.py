"""bitsandbytes 4/8-bit loading (QLoRA)."""

from __future__ import annotations

from typing import Any

from launcher.recipe.schema import QuantCfg


def bnb_config(cfg: QuantCfg) -> Any:
    """`BitsAndBytesConfig` for `cfg.bits` (4: NF4/FP4 with double quant, 8: LLM.int8)."""
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
    )
