"""QLoRA merges: the base weights as the 4-bit model saw them while the adapter trained.

An adapter trained against NF4/FP4 weights learned the quantization error too; merging it
into the full-precision base would add a delta fitted to other weights. `ftl merge` reads
the run's recipe and, for a 4-bit run, quantizes and dequantizes each base weight exactly as
transformers' loader did before folding the delta in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# bitsandbytes (through transformers) quantizes every nn.Linear but the output head; the
# embeddings are not Linear layers
NOT_QUANTIZED = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
    "score.weight",
    "classifier.weight",
)


def quantized_by_bnb(key: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and key.endswith(".weight") and not key.endswith(NOT_QUANTIZED)


def qlora_settings(adapter_dir: Path) -> dict[str, Any] | None:
    """The 4-bit settings an ftl run trained its adapter against (RUN/model's recipe)."""
    from launcher.recipe import runfolder

    recipe = runfolder.read_recipe(adapter_dir.parent)
    if recipe is None or recipe.quant.bits != 4:
        return None
    q = recipe.quant
    return {"type": q.type, "double_quant": q.double_quant, "dtype": recipe.model.dtype}


def dequantized(weight: Any, q: dict[str, Any]) -> Any:
    """`weight` as the 4-bit model saw it: quantized like transformers' loader does
    (blocksize 64, the run's type and double quantization), then dequantized."""
    import torch

    from launcher import compat

    bnb_f = compat.import_bitsandbytes().functional

    w = weight.to(getattr(torch, q["dtype"]))
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=64, compress_statistics=q["double_quant"], quant_type=q["type"]
    )
    return bnb_f.dequantize_4bit(packed, state)
