"""Vision-language models: the processor, the three parts (vision tower, projector,
language model), what is frozen, and where LoRA goes by default.

Families name their parts differently (LLaVA and PaliGemma: `vision_tower` +
`multi_modal_projector` + `language_model`; Qwen2/2.5-VL: `visual` with its `merger` +
`language_model`; Idefics3/SmolVLM: `vision_model` + `connector` + `text_model`). `parts()`
finds them by those names, so the recipe speaks of "the vision tower" and "the projector"
whatever the family.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from launcher.errors import Problem, UserError
from launcher.recipe.schema import ModelCfg

VISION = ("vision_tower", "visual", "vision_model")
PROJECTOR = ("multi_modal_projector", "connector", "merger", "mm_projector")
LANGUAGE = ("language_model", "text_model")


def check_vision_language(cfg: ModelCfg) -> None:
    """`task: vision_language` needs a model that reads images: say so before loading."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from launcher.models.build import _common, model_location

    where = model_location(cfg)
    try:
        config = AutoConfig.from_pretrained(where, **_common(cfg))
    except (OSError, ValueError) as e:
        raise UserError(
            Problem(f"cannot read the model config: {e}", key="model.name_or_path")
        ) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
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

    from launcher.models.build import _common, model_location

    where = model_location(cfg)
    try:
        try:
            proc = AutoProcessor.from_pretrained(where, **_common(cfg))
        except (ImportError, OSError, ValueError) as e:
            if "torchvision" not in str(e).lower() and "video processor" not in str(e).lower():
                raise
            proc = _image_only(_processor_class(where, cfg)).from_pretrained(where, **_common(cfg))
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
    from launcher.data.vlm import prefix_lm

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
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from launcher.models.build import _common

    name = None
    for f in ("processor_config.json", "preprocessor_config.json"):
        p = Path(where) / f
        if p.is_file():
            name = json.loads(p.read_text()).get("processor_class") or name
    if name is None:
        model_type = AutoConfig.from_pretrained(where, **_common(cfg)).model_type
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise ImportError(f"no processor class known for {where} (install torchvision)")
    return cls


def _image_only(cls: Any) -> Any:
    """`cls` without the video processor it would need torchvision for.

    Processors read their settings from the code of `__init__` (argument names: what they
    load and save), so the subclass's `__init__` is generated with the parent's arguments
    minus `video_processor`, and passes None for it.
    """
    if "video_processor" not in cls.get_attributes():
        return cls
    params = [
        p
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    if [p.name for p in params[:2]] != ["image_processor", "tokenizer"]:
        raise ImportError(f"{cls.__name__} needs torchvision for its video processor")
    defaults = {p.name: (None if p.default is p.empty else p.default) for p in params}
    args = ", ".join(f"{p.name}=_defaults[{p.name!r}]" for p in params)
    call = ", ".join(
        ["self", "image_processor", "tokenizer", "None"]
        + [f"{p.name}={p.name}" for p in params[2:]]
        + ["**kwargs"]
    )
    source = f"def __init__(self, {args}, **kwargs):\n    _cls.__init__({call})\n"
    namespace: dict[str, Any] = {"_cls": cls, "_defaults": defaults}
    exec(compile(source, f"<ftl image-only {cls.__name__}>", "exec"), namespace)  # noqa: S102
    # SmolVLM's apply_chat_template reads the video processor's frame settings even for
    # images-only conversations: none apply here
    absent = SimpleNamespace(num_frames=None, fps=None)
    return type(
        cls.__name__,
        (cls,),
        {
            "__init__": namespace["__init__"],
            "__module__": cls.__module__,
            "video_processor": absent,
        },
    )


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
    from launcher.models.adapters import _is_linear

    language = parts(model)["language"]
    names = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if _is_linear(m) and any(n.startswith(lm + ".") for lm in language)
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
