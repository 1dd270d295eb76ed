"""Every reach into a library's private state or undocumented behaviour, in one place.

Each function names the library versions it was checked against and why the public API
does not suffice. `tests/test_compat.py` asserts that every symbol used here still exists
(and still behaves as described) in the installed versions, so an upgrade fails a named
test instead of degrading silently. docs/architecture.md lists them all.

Nothing here imports a heavy library at module level: the CLI imports this module freely.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


# -- accelerate ---------------------------------------------------------------------------
def reset_accelerator_state() -> None:
    """Forget a previous run's accelerate settings (mixed precision, DeepSpeed/FSDP plugin)
    when training twice in one process (tests, notebooks); the process group is kept.

    `AcceleratorState` is a singleton that refuses a second, different configuration;
    accelerate's own tests reset it with the private `_reset_state`, and there is no
    public equivalent. Called unguarded: if it is renamed, this fails loudly.

    Checked against: accelerate 1.15 and 1.16.0.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def fsdp_on_cpu(timeout: Any) -> None:
    """Start the process group as gloo and declare it GPU-like, so accelerate applies FSDP2
    on a CPU-only host: accelerate turns FSDP on only for GPU-like process groups and would
    otherwise train unsharded, silently. FSDP2 (`fully_shard`) itself runs on CPU tensors
    over gloo. There is no public switch; GPUs never take this path.

    Checked against: accelerate 1.15 and 1.16.0 (`PartialState.distributed_type`).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(backend="gloo", timeout=timeout)
    state.distributed_type = DistributedType.MULTI_GPU


def deepspeed_config(acc: Any) -> dict[str, Any] | None:
    """The DeepSpeed config accelerate will hand DeepSpeed at `prepare` (None without
    DeepSpeed). ftl fills values that depend on the model (`hidden_size` autos, ZeRO-3
    bucket and prefetch sizes) into this dict in place before `prepare`: accelerate's
    plugin offers no setter, and `prepare` reads the dict then.

    Checked against: accelerate 1.15 and 1.16.0 (`state.deepspeed_plugin.deepspeed_config`).
    """
    plugin = acc.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def zero_flat_groups(lazy: Any) -> Any:
    """The fp32 flat partitions a lazy ZeRO-3 tensor of DeepSpeed's `zero_to_fp32` is
    gathered from (memory-mapped from the optimizer files): `ftl convert` releases their
    pages once read, so a 70B conversion needs no 70B of RAM. Internal to DeepSpeed.

    Checked against: deepspeed 0.19.8 (`utils.zero_to_fp32`, the lazy tensor's
    `flat_groups`).
    """
    return lazy.flat_groups


# -- torch ----------------------------------------------------------------------------------
def collective_timeout_s() -> float | None:
    """The default process group's timeout as torch really holds it (None: no group), for
    the preflight line that shows what the recipe's `distributed.timeout_minutes` became.
    torch exposes the timeout only through private attributes; a failure to read it is
    reported as None (the run goes on), and tests/test_compat.py reads it for real.

    Checked against: torch 2.13.0 (`distributed_c10d._get_default_group`, backend options).
    """
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return None
    from torch.distributed.distributed_c10d import _get_default_group

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return _get_default_group()._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return None


# -- transformers -------------------------------------------------------------------------
def enable_activation_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under the name this transformers
    version has: `activation_checkpointing_enable` since 5.25, which deprecates
    `gradient_checkpointing_enable` (removed in 6). Public API on both sides.

    Checked against: transformers 5.24 (old name only) and 5.25.0.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def forget_gguf_quantization(model: Any) -> None:
    """A model loaded from a GGUF file is dequantized on load (it holds plain float
    weights) but keeps a GGUF `quantization_config` and quantizer, so `save_pretrained`
    would write a config no loader accepts and refuse some operations. Drop them.
    transformers has no public "dequantized, forget the quantizer" call for GGUF.

    Checked against: transformers 5.24 and 5.25.0 (`hf_quantizer`, `is_quantized`).
    """
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None) if config is not None else None
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False


def keep_used_weight_renamings(model: Any) -> None:
    """transformers renames some checkpoints' keys on load (a Qwen2-VL checkpoint's
    `model.layers.*` become `model.language_model.layers.*`) and renames them back on save
    with the renamings the load recorded. The plain load records those it used; the
    ZeRO-3 load (transformers 5.24) records every renaming the class knows, and the save
    then writes keys no loader finds (`model.model.layers.*`). Keep the used ones, as the
    plain load does, so every strategy saves the checkpoint's own names.

    `_weight_conversions` and `was_used()` are private; a model without the attribute (no
    renamings) is left alone, but renamings without `was_used` fail loudly.

    Checked against: transformers 5.24 and 5.25.0 (`modeling_utils`, `core_model_loading`).
    """
    recorded = getattr(model, "_weight_conversions", None)  # None: nothing was renamed
    if recorded:
        model._weight_conversions = [c for c in recorded if c.was_used()]


def attention_pluggable(model: Any) -> bool:
    """Whether ftl's registered attention backend (`ftl_sdpa`) can replace `model`'s SDPA
    attention: the model class supports attention backends and the user did not choose
    eager or flash attention. transformers keeps both facts in private attributes.

    Checked against: transformers 5.24 and 5.25.0 (`_supports_attention_backend`,
    `config._attn_implementation`).
    """
    if not model._supports_attention_backend:
        return False
    return model.config._attn_implementation in ("sdpa", None)


def peft_lora_linear() -> Any:
    """PEFT's LoRA linear layer class, which `models/fused_lora.py` subclasses (overriding
    `forward` only) and swaps in by class (`module.__class__ = FusedLoraLinear`): the
    state dict, merging, adapter switching and saving stay PEFT's. The class lives at an
    internal path, and the fused forward reads `lora_variant`, `scaling`, `merged`,
    `disable_adapters`, `fan_in_fan_out` and `active_adapters`.

    Checked against: peft 0.21.2 (`tuners/lora/layer.py`).
    """
    from peft.tuners.lora.layer import Linear

    return Linear


KEPT_LOGITS_HELPER = "slice_logits_to_keep("


def supports_kept_logits(model: Any) -> bool:
    """Whether `model`'s forward slices hidden states by a boolean `logits_to_keep` mask
    (transformers' `slice_logits_to_keep`), so a causal-LM loss can ask for the logits of
    target positions only. A PEFT wrapper is looked through to the model it wraps.

    transformers has no flag for "accepts a mask", only an `int | Tensor` annotation that
    also covers the older index form, so the forward's source is read for the helper's call.
    Every causal LM and VLM of transformers 5 calls it; a model that does not gets full
    logits (slower, same loss). `tests/test_compat.py` fails if the helper is renamed.

    Checked against: transformers 5.24 and 5.25.0.
    """
    import inspect

    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # a class defined where its source is not on disk
        return False
    return KEPT_LOGITS_HELPER in source


def image_only_processor(cls: Any) -> Any:
    """`cls` without the video processor it would need torchvision for.

    Processors read their settings from the code of `__init__` (argument names: what they
    load and save), so the subclass's `__init__` is generated with the parent's arguments
    minus `video_processor`, and passes None for it. transformers offers no way to build
    Qwen2-VL's or SmolVLM's processor without torchvision (their video processor needs it).

    Checked against: transformers 5.24 and 5.25.0 (`ProcessorMixin.get_attributes`,
    `Qwen2VLProcessor`, `Idefics3Processor`, `SmolVLMProcessor`).
    """
    import inspect
    from types import SimpleNamespace

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


def processor_class_name(model_type: str) -> str | None:
    """transformers' processor class name for a model type (`AutoProcessor` needs
    torchvision to get there for some families). The mapping is internal.

    Checked against: transformers 5.24 and 5.25.0 (`models.auto.processing_auto`).
    """
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def image_text_to_text_model_types() -> Any:
    """The model types `AutoModelForImageTextToText` builds (to refuse a text-only model
    for `task: vision_language` before loading it). The mapping is internal.

    Checked against: transformers 5.24 and 5.25.0 (`models.auto.modeling_auto`).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


# -- bitsandbytes ------------------------------------------------------------------------
# The logger bitsandbytes' CPU backend warns on when its optional Hub kernel cannot load.
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"
_MISSING = object()


class _DropHubKernelWarning(logging.Filter):
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community"."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_HUB_KERNEL_WARNING):
            self.dropped += 1
            return False
        return True


def import_bitsandbytes() -> Any:
    """Import bitsandbytes without its import-time Hub kernel lookup; returns the module.

    On a CPU with AVX512-BF16 (Intel Sapphire Rapids and newer, also the host CPU of many
    GPU nodes), bitsandbytes 0.50 asks the Hugging Face Hub for a compiled kernel
    (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`) while it is being
    imported: online that downloads and loads a binary nobody asked for, offline it prints
    two warnings on every run. The kernel only serves bitsandbytes' repacked CPU inference
    layout, which ftl never uses (`keep_4bit_weights_as_trained`), so the lookup is
    skipped: `kernels` is hidden from this one import (a `None` entry in `sys.modules`
    makes `from kernels import ...` raise ImportError, which bitsandbytes catches) and its
    fallback warning is dropped. Nothing is patched; the module is restored afterwards.

    PEFT imports bitsandbytes as soon as `peft` is imported (peft 0.21: `helpers.py`,
    `tuners/lora/bnb.py`), so ftl calls this before its first PEFT import too.

    Checked against: bitsandbytes 0.50.2 (`backends/cpu/ops.py`), kernels 0.19.1.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    log = logging.getLogger(BNB_CPU_OPS_LOGGER)
    drop = _DropHubKernelWarning()
    log.addFilter(drop)
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # type: ignore[assignment]
    try:
        import bitsandbytes
    finally:
        if saved is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved  # type: ignore[assignment]
        log.removeFilter(drop)
    if drop.dropped:
        logging.getLogger("ftl").debug(
            "bitsandbytes: skipped its optional Hub kernel for repacked 4-bit CPU inference "
            "(ftl keeps 4-bit weights in the training layout; results are unchanged)"
        )
    return bitsandbytes


def import_peft() -> Any:
    """Import PEFT, bitsandbytes first through `import_bitsandbytes` (PEFT imports it
    eagerly) when it is installed; returns the `peft` module."""
    import importlib.util

    if "peft" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None:
        import_bitsandbytes()
    import peft

    return peft


# The instance attribute `Linear4bit.__init__` sets from `has_avx512bf16()`, and the
# QuantState attribute the repack sets.
BNB_REPACK_SWITCH = "support_avx512bf16_for_cpu"
BNB_REPACKED_FLAG = "packing_format_for_cpu"


def keep_4bit_weights_as_trained(model: Any) -> int:
    """Stop bitsandbytes from rewriting 4-bit weights in place during evaluation on CPU;
    returns how many layers were switched.

    bitsandbytes 0.50's `Linear4bit.forward` repacks the packed weight *in place* into a
    CPU-kernel layout, and replaces the quantization state's absmax by a bfloat16 copy
    (double quantization undone), whenever the CPU has AVX512-BF16, the module is in eval
    mode and the input needs no grad: the first eval of a QLoRA run on such a CPU then
    changes the weights every later training step uses (measured: training losses differ
    from a run without evals from the first eval on), and layers narrower than the
    64-element block crash (`shape '[32, 0]' is invalid`). Its inverse is lossy (absmax is
    re-quantized), so the repack is prevented rather than undone: the per-layer switch
    that `__init__` reads from `has_avx512bf16()` is turned off. There is no public option.

    Checked against: bitsandbytes 0.50.2 (`nn/modules.py`, `Linear4bit.forward`).
    """
    if "bitsandbytes" not in sys.modules:
        return 0  # nothing can be quantized by bitsandbytes without it being imported
    bnb = sys.modules["bitsandbytes"]
    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if not hasattr(module, BNB_REPACK_SWITCH):
                raise RuntimeError(
                    f"bitsandbytes {bnb.__version__}: Linear4bit has no {BNB_REPACK_SWITCH!r}; "
                    "ftl cannot keep 4-bit weights unchanged through evals on CPU "
                    "(launcher/compat.py, tests/test_compat.py)"
                )
            setattr(module, BNB_REPACK_SWITCH, False)
            switched += 1
    return switched


def assert_4bit_weights_as_trained(model: Any) -> None:
    """Raise if any 4-bit layer of `model` was repacked into bitsandbytes' CPU inference
    layout (see `keep_4bit_weights_as_trained`): a guard after every eval, so a library
    change can never silently train on rewritten weights."""
    if "bitsandbytes" not in sys.modules:
        return
    bnb = sys.modules["bitsandbytes"]
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = getattr(module.weight, "quant_state", None)
            if getattr(state, BNB_REPACKED_FLAG, False):
                raise RuntimeError(
                    f"bitsandbytes {bnb.__version__} repacked the 4-bit weight of {name} "
                    "in place during an eval; training would continue on rewritten weights. "
                    "Please report this with `ftl env` (launcher/compat.py)"
                )
