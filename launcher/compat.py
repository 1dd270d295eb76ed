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
