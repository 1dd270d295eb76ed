"""Reading a PEFT LoRA / rsLoRA / DoRA adapter, and the math that folds it into a weight.

    LoRA     W' = W + s * B @ A,  s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA     W' = m / ||W + s * B @ A||_row * (W + s * B @ A)
    embedding LoRA  E' = E + s * (B @ A)^T

Used by `ftl merge` and `ftl export` (`launcher/tools/merge.py`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError

PREFIX = "base_model.model."

# adapter_config keys whose non-default values change the math: refused, not ignored
UNSUPPORTED = {
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_bdlora": False,
}


@dataclass
class Delta:
    """One adapted module: its LoRA factors (and DoRA magnitude)."""

    a: Any = None
    b: Any = None
    magnitude: Any = None
    embedding: bool = False
    alpha: float = 0.0


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    deltas: dict[str, Delta] = field(default_factory=dict)  # base weight key -> delta
    replaced: dict[str, Any] = field(default_factory=dict)  # modules_to_save tensors

    @property
    def nbytes(self) -> int:
        tensors = [
            t for d in self.deltas.values() for t in (d.a, d.b, d.magnitude) if t is not None
        ]
        tensors += list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in tensors)


# -- reading ---------------------------------------------------------------------------
def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the key matches the module path's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _open_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError: truncated, not safetensors, ...
        raise UserError(
            Problem(
                f"cannot read {path}: {e}",
                hint="the file is damaged or incomplete (an interrupted copy or download?): "
                "copy it again",
            )
        ) from None


def read_adapter(path: Path) -> Adapter:
    """The adapter's factors, keyed by the base weight they change."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(
            Problem(
                f"{path} has no adapter_config.json",
                key="--adapter",
                hint="pass the folder PEFT (or ftl, in RUN/model) saved the adapter to",
            )
        )
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(
            Problem(
                f"{path} holds a {config.get('peft_type')} adapter; only LoRA/DoRA merge",
                key="--adapter",
            )
        )
    bad = [k for k, default in UNSUPPORTED.items() if config.get(k) not in (default, None, [], {})]
    if bad:
        raise UserError(
            Problem(
                f"the adapter uses {', '.join(bad)}, which ftl merge does not fold in",
                key="--adapter",
                hint="merge with PEFT's merge_and_unload instead",
            )
        )
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(
            Problem(
                f"{path} has no adapter_model.safetensors",
                key="--adapter",
                hint="save the adapter with safetensors (PEFT's default)",
            )
        )
    adapter = Adapter(path, config)
    alpha, patterns = float(config["lora_alpha"]), config.get("alpha_pattern") or {}
    with _open_safetensors(weights) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            m = re.match(
                r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$", name
            )
            if m:
                module, part = m.group(1), m.group(2)
                d = adapter.deltas.setdefault(f"{module}.weight", Delta())
                d.alpha = float(_pattern_value(patterns, module, alpha))
                tensor = f.get_tensor(key)
                if part.endswith("A"):
                    d.a = tensor
                else:
                    d.b = tensor
                d.embedding = part.startswith("lora_embedding")
                continue
            m = re.match(r"(.+)\.lora_magnitude_vector(\.weight)?$", name)
            if m:
                adapter.deltas.setdefault(f"{m.group(1)}.weight", Delta()).magnitude = f.get_tensor(
                    key
                )
                continue
            # modules_to_save, or the full weight of a targeted layer PEFT saved with the
            # adapter (`X.base_layer.weight`: embeddings, grown by added tokens)
            adapter.replaced[name.replace(".base_layer.", ".")] = f.get_tensor(key)
    broken = [k for k, d in adapter.deltas.items() if d.a is None or d.b is None]
    if broken:
        raise UserError(
            Problem(f"{weights}: {broken[0]} lacks its lora_A or lora_B", key="--adapter")
        )
    return adapter


# -- the math ----------------------------------------------------------------------------
def scaling(cfg: dict[str, Any], d: Delta) -> float:
    r = d.a.shape[0]
    return d.alpha / math.sqrt(r) if cfg.get("use_rslora") else d.alpha / r


def merged(weight: Any, d: Delta, cfg: dict[str, Any], out_dtype: Any) -> Any:
    """`weight` with the adapter folded in, computed in float32 (shapes were checked by
    `plan`, from the headers, before anything was read)."""
    import torch

    w = weight.to(torch.float32)
    s = scaling(cfg, d)
    delta = d.b.to(torch.float32) @ d.a.to(torch.float32)
    if d.embedding or cfg.get("fan_in_fan_out"):
        delta = delta.T
    w = w + s * delta
    if d.magnitude is not None:  # DoRA: rescale every output row to its learned norm
        norm = torch.linalg.norm(w, dim=1)
        w = (d.magnitude.to(torch.float32) / norm).unsqueeze(1) * w
    return w.to(out_dtype)
