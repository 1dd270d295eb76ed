"""Every reach of launcher/compat.py into a library's private state or undocumented
behaviour still exists, and still behaves as compat.py says, in the installed versions:
an upgrade that moves one fails here, by name, instead of degrading silently."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from launcher import compat


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def linear4bit(bnb, forced: bool):
    """A quantized 64x64 layer, built as on a CPU with AVX512-BF16 when `forced`."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 64, bias=False)
    layer = bnb.nn.Linear4bit(
        64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
    )
    layer.weight = bnb.nn.Params4bit(
        plain.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer.weight = layer.weight.to("cpu")  # quantizes on the CPU
    setattr(layer, compat.BNB_REPACK_SWITCH, forced)
    return layer


def test_bitsandbytes_eval_repack_switch_still_exists(bnb):
    layer = bnb.nn.Linear4bit(64, 64)
    assert hasattr(layer, compat.BNB_REPACK_SWITCH)
    src = inspect.getsource(bnb.nn.Linear4bit.forward)
    assert compat.BNB_REPACK_SWITCH in src and compat.BNB_REPACKED_FLAG in src


def test_eval_repacks_4bit_weights_in_place_unless_ftl_keeps_them(bnb):
    x = torch.randn(3, 64)
    # the condition is real: in eval, without grad, the weight is rewritten in place
    raw = linear4bit(bnb, forced=True).eval()
    try:
        with torch.no_grad():
            raw(x)
    except Exception:  # noqa: S110 - without AVX512-BF16 the repacked matmul may not run
        pass
    assert getattr(raw.weight.quant_state, compat.BNB_REPACKED_FLAG, False)
    assert raw.weight.quant_state.absmax.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="repacked the 4-bit weight"):
        compat.assert_4bit_weights_as_trained(torch.nn.Sequential(raw))

    # ftl's switch: the same forward leaves weight, absmax and nesting as training has them
    kept = linear4bit(bnb, forced=True)
    model = torch.nn.Sequential(kept)
    assert compat.keep_4bit_weights_as_trained(model) == 1
    model.train()
    want = model(x).detach()
    state = kept.weight.quant_state
    w, absmax, nested = kept.weight.data.clone(), state.absmax.clone(), state.nested
    model.eval()
    with torch.no_grad():
        got = model(x)
    assert torch.equal(kept.weight.data, w) and torch.equal(state.absmax, absmax)
    assert state.nested is nested and not getattr(state, compat.BNB_REPACKED_FLAG, False)
    assert torch.equal(got, want)  # eval computes exactly what training computes
    compat.assert_4bit_weights_as_trained(model)


def test_bitsandbytes_hub_kernel_lookup_is_where_compat_looks_for_it(bnb):
    import bitsandbytes.backends.cpu.ops as cpu_ops

    src = inspect.getsource(cpu_ops)
    assert "get_kernel(" in src and "from kernels import" in src
    assert compat._HUB_KERNEL_WARNING in src
    assert cpu_ops.logger.name == compat.BNB_CPU_OPS_LOGGER


RUN = """
import sys
from launcher.cli.main import main
rc = main(["train", sys.argv[1], *sum((["-o", o] for o in sys.argv[2:]), [])])
print("RC", rc, "BNB", "bitsandbytes" in sys.modules)
"""


def ftl_train(recipe, *overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN), str(recipe), *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bitsandbytes_is_imported_only_when_something_is_quantized(cls_recipe, chat_recipe):
    full = ftl_train(cls_recipe, "train.max_steps=2", "train.eval_every=null")
    assert "RC 0 BNB False" in full.stdout, full.stdout + full.stderr[-3000:]
    # a LoRA run imports PEFT, which imports bitsandbytes: through compat, with no Hub
    # kernel lookup (on AVX512-BF16 CPUs bitsandbytes would print it twice)
    lora = ftl_train(chat_recipe, "train.max_steps=2", "train.eval_every=null")
    assert "RC 0" in lora.stdout, lora.stdout + lora.stderr[-3000:]
    for noise in ("kernels-community", "gemm_4bit_forward", "publisher trust check"):
        assert noise not in lora.stderr + lora.stdout, lora.stderr[-3000:]


def test_import_bitsandbytes_restores_the_kernels_module(bnb):
    import kernels  # noqa: F401  (transformers imports it: it must come back as it was)

    code = (
        "import sys, kernels; from launcher import compat; k = sys.modules['kernels'];"
        "compat.import_bitsandbytes(); assert sys.modules['kernels'] is k; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- every other reach: the private names compat.py uses still exist --------------------
def test_accelerate_reaches_still_exist():
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    assert callable(AcceleratorState._reset_state)
    assert "distributed_type" in inspect.getsource(PartialState.__init__)
    assert DistributedType.MULTI_GPU
    assert "deepspeed_plugin" in inspect.getsource(AcceleratorState)


def test_torch_collective_timeout_is_read_for_real():
    code = (
        "import datetime, os, torch.distributed as td\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29517')\n"
        "td.init_process_group('gloo', rank=0, world_size=1,"
        " timeout=datetime.timedelta(minutes=7))\n"
        "from launcher import compat\n"
        "print(compat.collective_timeout_s())\n"
        "td.destroy_process_group()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "420.0", proc.stderr[-2000:]


def test_transformers_reaches_still_exist(tiny_llama):
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import WeightTransform
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert compat.supports_kept_logits(model)  # the helper's name is still in the forward
    assert compat.attention_pluggable(model)
    assert hasattr(sdpa, "repeat_kv") and hasattr(sdpa, "sdpa_attention_forward")
    assert hasattr(ALL_MASK_ATTENTION_FUNCTIONS, "register")
    assert callable(WeightTransform.was_used)
    assert "_weight_conversions" in inspect.getsource(
        __import__("transformers.core_model_loading", fromlist=["x"])
    )
    assert compat.processor_class_name("llava") == "LlavaProcessor"
    assert "llava" in compat.image_text_to_text_model_types()
    from transformers import modeling_utils

    src = inspect.getsource(modeling_utils)  # what forget_gguf_quantization resets
    assert "self.hf_quantizer" in src and "is_quantized" in src


def test_peft_and_deepspeed_reaches_still_exist(tiny_llama):
    from deepspeed.utils import zero_to_fp32
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cls = compat.peft_lora_linear()
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"])
    )
    layer = next(m for m in peft_model.modules() if type(m) is cls)
    for name in ("lora_variant", "scaling", "merged", "disable_adapters", "fan_in_fan_out"):
        assert hasattr(layer, name), name
    assert layer.active_adapters == ["default"]
    assert "self.flat_groups = flat_groups" in inspect.getsource(zero_to_fp32.GatheredTensor)
