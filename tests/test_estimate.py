"""`ftl estimate`: the memory arithmetic, DeepSpeed's estimators, a measured CPU peak, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.dist.estimate import (
    GIB,
    Hardware,
    ModelFacts,
    Workload,
    activation_bytes,
    estimate,
    facts_from_numbers,
    quant_bytes,
)
from launcher.dist.strategies import STRATEGIES
from launcher.models.facts import facts_from_recipe
from launcher.recipe import load_recipe
from launcher.recipe.schema import AdapterCfg

ROOT = Path(__file__).resolve().parent.parent

# Qwen2.5-7B and Llama-2-7B as their configs describe them
QWEN_7B = {"heads": 28, "kv_heads": 4, "intermediate": 18944}
LLAMA2_7B = {"heads": 32, "intermediate": 11008}


def _facts(params: int, largest: int = 0) -> ModelFacts:
    return ModelFacts(
        params=params,
        trainable=params,
        layers=32,
        hidden=4096,
        heads=32,
        vocab=32000,
        intermediate=11008,
        largest_layer=largest,
        block_params=params // 40,
    )


def _recipe(tmp_path: Path, model: str, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"task: causal_lm\nmodel:\n  name_or_path: {model}\ndata:\n  train: none.jsonl\n"
        f"  max_length: 128\ntrain:\n  micro_batch_size: 4\noutput:\n  dir: {tmp_path / 'run'}\n"
        + extra
    )
    return path


# -- pure arithmetic ------------------------------------------------------------------------


def test_quant_bytes_per_weight():
    assert quant_bytes(8) == 1.0
    assert quant_bytes(4, double_quant=False) == pytest.approx(0.5625)
    assert quant_bytes(4) == pytest.approx(0.5 + 1 / 64 + 1 / 4096)


def test_activations_by_hand():
    f = ModelFacts(params=1, trainable=1, layers=2, hidden=8, heads=2, vocab=10, intermediate=16)
    work = Workload(seq_len=4, micro_batch=3)  # fp32: e = 4
    norm = 4 * 8 + 2 * 4 * 8  # fp32 input + normalized + scaled
    block = 2 * norm + 4 * 4 * 8 + 4 * 4 * 16
    logits = 10 * (4 + 12)
    full, ckpt = activation_bytes(f, work)
    assert full == 12 * (2 * block + norm + logits)
    assert ckpt == 12 * (2 * 4 * 8 + norm + max(logits, 2 * block))
    # bf16 halves what is stored in 16 bits, not the fp32 norm inputs nor the loss's fp32 buffers
    half, _ = activation_bytes(f, Workload(seq_len=4, micro_batch=3, precision="bf16"))
    block16 = 2 * (4 * 8 + 2 * 2 * 8) + 4 * 2 * 8 + 4 * 2 * 16
    assert half == 12 * (2 * block16 + (4 * 8 + 2 * 2 * 8) + 10 * (2 + 12))


def test_eager_attention_grows_with_the_square_of_the_sequence():
    f = facts_from_numbers(int(1e9), 16, 2048, 32000, heads=16)
    eager = ModelFacts(**{**f.__dict__, "attention": "eager"})
    per_token = {}
    for s in (1024, 4096):
        work = Workload(seq_len=s, micro_batch=1, precision="bf16")
        per_token[s] = (activation_bytes(f, work)[0] / s, activation_bytes(eager, work)[0] / s)
    assert per_token[1024][0] == per_token[4096][0]  # SDPA: linear in s
    assert per_token[4096][1] - per_token[4096][0] == 4 * (per_token[1024][1] - per_token[1024][0])


def test_lora_dropout_costs_activations():
    lora = AdapterCfg(type="lora", r=16)
    f = facts_from_numbers(int(6.74e9), 32, 4096, 32000, adapter=lora, **LLAMA2_7B)
    assert f.lora_inputs == 6 * 4096 + 11008
    base = Workload(seq_len=2048, micro_batch=1, precision="bf16", adapter="lora")
    dropped = Workload(**{**base.__dict__, "lora_dropout": 0.05})
    assert activation_bytes(f, dropped)[0] > activation_bytes(f, base)[0]


def test_lora_counts_from_numbers():
    full = facts_from_numbers(int(6.74e9), 32, 4096, 32000, **LLAMA2_7B)
    assert full.trainable == full.params == int(6.74e9)
    lora = facts_from_numbers(
        int(6.74e9), 32, 4096, 32000, adapter=AdapterCfg(type="lora", r=8), **LLAMA2_7B
    )
    # r x (in + out) on the 7 projections of 32 blocks: 20.0M, what PEFT prints for Llama-2-7B
    assert lora.trainable == 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert lora.params == int(6.74e9) + lora.trainable
    # --intermediate left out: what --params implies
    guess = facts_from_numbers(int(6.74e9), 32, 4096, 32000, heads=32)
    assert abs(guess.intermediate - 11008) < 300


@pytest.mark.parametrize(
    "params,largest,gpus,nodes",
    [
        (int(7.6e9), 545_000_000, 8, 1),
        (int(1.3e9), 51_000_000, 4, 2),
        (int(70e9), 1_050_000_000, 8, 4),
    ],
)
def test_model_states_agree_with_deepspeed(params, largest, gpus, nodes):
    """bf16 weights, fp32 Adam, full fine-tuning: DeepSpeed's own estimators' setting."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    work = Workload(seq_len=512, micro_batch=1, model_dtype="bfloat16", precision="bf16")
    result = estimate(
        _facts(params, largest), work, Hardware(gpus=gpus, gpu_mem_gib=80, machines=nodes)
    )
    z2, z3, off = (result.row(n) for n in ("zero2", "zero3", "zero3_offload"))
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)
    assert abs(z2.states - gpu) <= 2 and abs(z2.cpu - cpu) <= 1  # floor rounding per column
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True
    )
    assert abs(z3.states - gpu) <= 3 and abs(z3.cpu - cpu) <= 1
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, gpus, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    assert off.states == gpu and abs(off.cpu - cpu) <= 1


def test_fp32_default_is_not_deepspeeds_bf16_setting():
    """Our default (fp32, no master copy): 16 B/param on one process; DeepSpeed fp32: 4 + 20/N."""
    p = int(1e9)
    one = estimate(_facts(p), Workload(512, 1), Hardware(1, 80))
    assert one.row("none").states == 16 * p
    eight = estimate(_facts(p), Workload(512, 1), Hardware(8, 80))
    assert eight.row("zero2").states == 4 * p + 8 * p // 8 + 12 * p // 8
    assert eight.row("ddp").states == 4 * p + 2 * 4 * p + 8 * p  # DDP's gradient buckets


def test_sharding_lowers_states_per_gpu():
    rows = estimate(
        _facts(int(7e9), int(5e8)), Workload(2048, 1, precision="bf16"), Hardware(8, 80)
    )
    states = [rows.row(n).states for n in ("ddp", "zero1", "zero2", "zero3", "zero3_offload")]
    assert states == sorted(states, reverse=True)
    assert rows.row("fsdp").states < rows.row("zero2").states


def test_7b_full_on_8x80_picks_a_zero_stage():
    facts = facts_from_numbers(int(7.6e9), 28, 3584, 152064, **QWEN_7B)
    work = Workload(2048, 1, model_dtype="bfloat16", precision="bf16")
    choice = estimate(facts, work, Hardware(8, 80)).cheapest
    assert choice is not None and choice.strategy.startswith("zero")
    assert not choice.gradient_checkpointing
    # a smaller GPU pushes it up the ladder
    small = estimate(facts, work, Hardware(8, 40)).cheapest
    assert small is not None and small.strategy in ("zero3", "fsdp")


def test_lora_7b_on_one_24gb_gpu_picks_none():
    lora = AdapterCfg(type="lora", r=16)
    facts = facts_from_numbers(int(6.74e9), 32, 4096, 32000, adapter=lora, **LLAMA2_7B)
    work = Workload(2048, 1, model_dtype="bfloat16", precision="bf16", adapter="lora")
    result = estimate(facts, work, Hardware(1, 24))
    assert result.cheapest is not None and result.cheapest.strategy == "none"
    assert result.cheapest.gradient_checkpointing  # 2048 tokens need it on 24 GB
    full = estimate(
        facts_from_numbers(int(6.74e9), 32, 4096, 32000, **LLAMA2_7B),
        Workload(2048, 1, model_dtype="bfloat16", precision="bf16"),
        Hardware(1, 24),
    )
    # full fine-tuning of 7B fits one 24 GB GPU only with everything offloaded to the CPU
    assert full.cheapest is not None and full.cheapest.strategy == "zero3_offload"


def test_qlora_packs_the_base_and_shards_what_can_be_sharded():
    lora = AdapterCfg(type="lora", r=16)
    facts = facts_from_numbers(int(6.74e9), 32, 4096, 32000, adapter=lora, **LLAMA2_7B)
    work = Workload(2048, 1, model_dtype="bfloat16", precision="bf16", adapter="lora")
    qlora = Workload(**{**work.__dict__, "quant_bits": 4})
    int8 = Workload(**{**work.__dict__, "quant_bits": 8})
    plain, packed = estimate(facts, work, Hardware(4, 24)), estimate(facts, qlora, Hardware(4, 24))
    assert packed.row("none").params < 0.4 * plain.row("none").params
    # 4-bit weights shard under ZeRO-3 and FSDP2 (packed in a float storage dtype)
    assert packed.row("zero3").params < 0.5 * packed.row("ddp").params
    assert packed.row("fsdp").candidate and packed.row("zero3").candidate
    # 8-bit ones do not survive FSDP2 (the recipe checks refuse it too)
    eight = estimate(facts, int8, Hardware(4, 24))
    assert not eight.row("fsdp").candidate and "8-bit" in eight.row("fsdp").note
    assert eight.row("zero3").candidate


def test_8bit_optimizer_states_take_a_quarter():
    facts = facts_from_numbers(int(6.74e9), 32, 4096, 32000, **LLAMA2_7B)
    work = Workload(2048, 1, model_dtype="float32", precision="fp32", adapter="full")
    eight = Workload(**{**work.__dict__, "optimizer": "adamw_8bit"})
    a, b = estimate(facts, work, Hardware(1, 80)), estimate(facts, eight, Hardware(1, 80))
    assert b.row("none").optim == pytest.approx(a.row("none").optim * (2.03125 / 8), rel=1e-3)


# -- facts from a real model, exactly --------------------------------------------------------


def test_facts_from_recipe_count_exactly(chat_recipe, tiny_llama):
    import transformers

    from launcher.models.adapters import apply_adapter
    from launcher.train.tasks import TASKS

    recipe = load_recipe(chat_recipe)
    facts = facts_from_recipe(recipe)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert facts.block_params == sum(p.numel() for p in model.model.layers[0].parameters())
    model = apply_adapter(model, recipe.adapter, TASKS["causal_lm"], quantized=False)
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert facts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (facts.layers, facts.hidden, facts.intermediate, facts.gated_mlp) == (2, 32, 64, True)
    assert facts.lora_inputs == 6 * 32 + 64  # q, k, v, o, gate, up take h; down takes i


# -- measured: the estimate against the peak memory of real training on this CPU -------------

# A child process trains a Llama built from a config, as our loop does on CPU (glibc keeps
# freed memory, fused AdamW, grads set to None), and reports its peak RSS above the RSS it
# had just before building the model: Linux's VmHWM, reset through /proc/self/clear_refs.
# A one-step warm-up on a tiny model first loads the lazy modules and kernels.
MEASURE = r"""
import ctypes, gc, json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from launcher.train.host import keep_freed_memory
from launcher.train.optim import build_optimizer

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def train(cfg, b, s, steps, ckpt):
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model = AutoModelForCausalLM.from_config(cfg)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    opt = build_optimizer("adamw", model.parameters(), lr=1e-4, weight_decay=0.0,
                          betas=(0.9, 0.999), eps=1e-8)
    for _ in range(steps):  # step 2 runs with the optimizer states in memory
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

where, b, s, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError as e:
    print(json.dumps({"skip": f"cannot reset the peak RSS: {e}"}))
    raise SystemExit(0)
keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(where)
tiny = AutoConfig.from_pretrained(where, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=256)
out = {}
for ckpt in (False, True):
    train(tiny, b, s, 1, ckpt)
    gc.collect(); libc.malloc_trim(0)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    train(cfg, b, s, steps, ckpt)
    out["ckpt" if ckpt else "plain"] = status("VmHWM") - base
    gc.collect(); libc.malloc_trim(0)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS through /proc")
def test_estimate_within_25_percent_of_measured_cpu_peak(tmp_path):
    from transformers import LlamaConfig

    # 20.5M parameters (model states 313 MiB) and 4 x 128 tokens (activations 190 MiB):
    # both well above the noise of a CPU process, two steps in ~25 s on two cores
    model = tmp_path / "model"
    LlamaConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ).save_pretrained(model)  # the config alone: the estimate never needs the weights
    facts = facts_from_recipe(load_recipe(_recipe(tmp_path, str(model))))
    row = estimate(facts, Workload(seq_len=128, micro_batch=4), Hardware(1, 80)).row("none")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model), "4", "128", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in measured:
        pytest.skip(measured["skip"])
    for key, estimated in (("plain", row.total), ("ckpt", row.total_ckpt)):
        print(
            f"{key}: estimated {estimated / 2**20:.0f} MiB, measured {measured[key] / 2**20:.0f} MiB"
        )
        assert 0.75 <= estimated / measured[key] <= 1.25, (key, estimated, measured[key])
    assert measured["ckpt"] < 0.9 * measured["plain"]  # the model really did checkpoint


# -- the command line --------------------------------------------------------------------------


def test_cli_table_and_cheapest(tmp_path, capsys):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded", "adapter:\n  type: lora\n")
    numbers = ["--params", "6.74e9", "--layers", "32", "--hidden", "4096", "--vocab", "32000"]
    bf16 = ["-o", "model.dtype=bfloat16", "-o", "train.precision=bf16"]
    code = main(["estimate", str(recipe), *bf16, "--gpu-mem", "24", *numbers, "--heads", "32"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[4:11]] == list(STRATEGIES)
    assert out.splitlines()[-1] == "cheapest that fits: none (without gradient checkpointing)"


def test_cli_json_shape(tmp_path, capsys, tiny_llama):
    recipe = _recipe(tmp_path, str(tiny_llama))
    code = main(["estimate", str(recipe), "--gpus", "4", "--gpu-mem", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"unit", "model", "workload", "hardware", "strategies", "cheapest"}
    assert data["unit"] == "bytes" and data["hardware"]["world"] == 4
    assert [r["strategy"] for r in data["strategies"]] == list(STRATEGIES)
    for r in data["strategies"]:
        assert r["total"] == r["params"] + r["grads"] + r["optim"] + r["activations"]
        assert r["fits"] == (r["candidate"] and r["total"] <= GIB)
    assert data["cheapest"] == {"strategy": "ddp", "gradient_checkpointing": False}
    assert code == 0
    assert data["model"]["params"] == data["model"]["trainable"] > 0


def test_cli_nothing_fits_exits_1(tmp_path, capsys):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded")
    numbers = ["--params", "70e9", "--layers", "80", "--hidden", "8192", "--vocab", "128256"]
    # ZeRO-3 offload squeezes 70B onto one GPU, but wants ~2 TiB of CPU memory for it
    assert main(["estimate", str(recipe), "--gpu-mem", "24", *numbers]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("cheapest that fits: zero3_offload")
    assert main(["estimate", str(recipe), "--gpu-mem", "24", "--cpu-mem", "512", *numbers]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("nothing fits in 24 GiB per GPU and 512 GiB") and "lora" in last


def test_cli_unavailable_model_is_a_user_error(tmp_path, capsys):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded")
    assert main(["estimate", str(recipe), "--gpu-mem", "24"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "--params" in err and "--model-config" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--gpu-mem", "0"],
        ["--gpu-mem", "24", "--params", "7e9"],  # the other numbers are missing
        ["--gpu-mem", "24", "--model-config", "no/such/dir"],
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, capsys, args):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded")
    assert main(["estimate", str(recipe), *args]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_malformed_number_exits_2(tmp_path):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded")
    with pytest.raises(SystemExit) as e:
        main(["estimate", str(recipe), "--gpu-mem", "24", "--gpus", "two"])
    assert e.value.code == 2


def test_cli_reads_a_model_config(tmp_path, capsys, tiny_llama):
    recipe = _recipe(tmp_path, "ftl-tests/not-downloaded")
    code = main(
        [
            "estimate",
            str(recipe),
            "--gpu-mem",
            "1",
            "--model-config",
            str(tiny_llama / "config.json"),
        ]
    )
    assert code == 0
    assert "facts from " + str(tiny_llama) in capsys.readouterr().out


def test_cli_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom launcher.cli.main import main\ntry:\n    main(['estimate', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"
