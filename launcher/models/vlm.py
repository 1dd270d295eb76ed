"""Vision-language models: the processor, the three parts (vision tower, projector,
language model), what is frozen, and where LoRA goes by default.

Families name their parts differently (LLaVA and PaliGemma: `vision_tower` +
`multi_modal_projector` + `language_model`; Qwen2/2.5-VL: `visual` with its `merger` +
`language_model`; Idefics3/SmolVLM: `vision_model` + `connector` + `text_model`). `parts()`
finds them by those names, so the recipe speaks of "the vision tower" and "the projector"
whatever the family.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launcher import compat
from launcher.errors import Problem, UserError
from launcher.models.families import LANGUAGE, PROJECTOR, VISION, prefix_lm
from launcher.recipe.schema import ModelCfg


def check_vision_language(cfg: ModelCfg) -> None:
    """`task: vision_language` needs a model that reads images: say so before loading."""
    from transformers import AutoConfig

    from launcher.models.build import load_kwargs, model_location

    where = model_location(cfg)
    try:
        config = AutoConfig.from_pretrained(where, **load_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(f"cannot read the model config: {e}", key="model.name_or_path")
        ) from None
    if config.model_type not in compat.image_text_to_text_model_types():
        raise UserError(
            Problem(
                f"{cfg.name_or_path} is a '{config.model_type}' model, which does not read "
                "images: task vision_language needs a vision-language model (LLaVA, "
                "Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, PaliGemma, ...)",
                key="model.name_or_path",
                hint="point model.name_or_path at a vision-language model, or train this "
                "one on text with task: causal_lm and format: chat",
            )
        )


def load_processor(cfg: ModelCfg) -> Any:
    """The model's processor: its tokenizer, image processor and chat template.

    Where torchvision is missing (CPU-only and some ARM installs), processors that also
    hold a video processor (Qwen2-VL, SmolVLM) cannot be built by transformers at all; ftl
    then builds the same processor class without its video part, which is all image SFT
    uses. It saves under the original class name, so the saved model loads normally.
    """
    from transformers import AutoProcessor

    from launcher.models.build import load_kwargs, model_location

    where = model_location(cfg)
    try:
        try:
            proc = AutoProcessor.from_pretrained(where, **load_kwargs(cfg))
        except (ImportError, OSError, ValueError) as e:
            if "torchvision" not in str(e).lower() and "video processor" not in str(e).lower():
                raise
            proc = compat.image_only_processor(_processor_class(where, cfg)).from_pretrained(
                where, **load_kwargs(cfg)
            )
    except (OSError, ValueError, ImportError) as e:
        raise UserError(
            Problem(
                f"cannot load the processor from {where}: {e}",
                key="model.name_or_path",
                hint="a vision-language model folder has its processor files "
                "(processor_config.json or preprocessor_config.json, tokenizer, chat template)",
            )
        ) from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or not hasattr(proc, "image_processor"):
        raise UserError(
            Problem(
                f"the processor at {where} ({type(proc).__name__}) has no tokenizer and image "
                "processor: this is not a vision-language model",
                key="model.name_or_path",
            )
        )

    if not getattr(proc, "chat_template", None) and not prefix_lm(proc):
        raise UserError(
            Problem(
                f"the processor at {where} has no chat template: ftl renders conversations "
                "with the model's own template",
                key="model.name_or_path",
                hint="use an instruct/chat checkpoint, or add chat_template.jinja to the folder",
            )
        )
    if tok.eos_token_id is None:
        raise UserError(
            Problem(
                f"the tokenizer at {where} has no EOS token: the model could not learn to stop",
                key="model.name_or_path",
            )
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return proc


def _processor_class(where: str, cfg: ModelCfg) -> Any:
    import transformers
    from transformers import AutoConfig

    from launcher.models.build import load_kwargs

    name = None
    for f in ("processor_config.json", "preprocessor_config.json"):
        p = Path(where) / f
        if p.is_file():
            name = json.loads(p.read_text()).get("processor_class") or name
    if name is None:
        model_type = AutoConfig.from_pretrained(where, **load_kwargs(cfg)).model_type
        name = compat.processor_class_name(model_type)
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise ImportError(f"no processor class known for {where} (install torchvision)")
    return cls


def parts(model: Any) -> dict[str, list[str]]:
    """Module paths of the vision tower, projector and language model (outermost first)."""
    found: dict[str, list[str]] = {"vision": [], "projector": [], "language": []}
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        for part, names in (("vision", VISION), ("projector", PROJECTOR), ("language", LANGUAGE)):
            if last in names and not any(name.startswith(p + ".") for p in found[part]):
                found[part].append(name)
    return found


def freeze(model: Any, *, vision: bool, projector: bool) -> dict[str, int]:
    """Stop gradients into the vision tower and/or the projector; returns the number of
    parameters frozen per part. A projector inside the vision tower (Qwen2-VL's merger)
    follows its own setting."""
    p = parts(model)
    if not p["vision"] or not p["language"]:
        raise UserError(
            Problem(
                f"cannot find the vision tower and language model of {type(model).__name__} "
                f"(looked for modules named {VISION} and {LANGUAGE})",
                key="model.name_or_path",
            )
        )
    counts = {"vision": 0, "projector": 0}
    for name, param in model.named_parameters():
        in_proj = any(name.startswith(m + ".") for m in p["projector"])
        in_vision = any(name.startswith(m + ".") for m in p["vision"])
        if in_proj:
            if projector:
                param.requires_grad_(False)
                counts["projector"] += param.numel()
        elif in_vision and vision:
            param.requires_grad_(False)
            counts["vision"] += param.numel()
    return counts


def lora_targets(model: Any) -> str:
    """A regex for PEFT: every linear layer of the language model, nothing in the vision
    tower or projector (LoRA on the language model is the VLM default)."""
    from launcher.models.adapters import is_linear

    language = parts(model)["language"]
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if is_linear(m) and any(n.startswith(lm + ".") for lm in language)
        }
    )
    if not names:
        raise UserError(
            Problem(
                f"no linear layers found in the language model of {type(model).__name__}",
                key="adapter.target_modules",
                hint="name the layers in adapter.target_modules",
            )
        )
    lm = "|".join(re.escape(x.rsplit(".", 1)[-1]) for x in language)
    return rf"(.*\.)?({lm})\.(.*\.)?({'|'.join(map(re.escape, names))})"


def projector_modules(model: Any) -> list[str]:
    """Projector module paths, for PEFT's modules_to_save (a trained projector under LoRA)."""
    return parts(model)["projector"]
