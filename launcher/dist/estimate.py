"""Per-device memory of a training run under every strategy, and the cheapest that fits.

Two halves. `estimate()` is pure arithmetic from `ModelFacts` (what the model is),
`Workload` (how the recipe trains it) and `Hardware` (how many GPUs of what size); it
imports nothing heavy and is unit-tested against DeepSpeed's own estimators.
`launcher.models.facts.facts_from_recipe()` reads the facts of a recipe's model without loading any weight:
its config, then the model built on torch's meta device (exact parameter counts, LoRA
included). `facts_from_numbers()` takes them from the command line instead.

Conventions (docs/estimate.md derives them):
- model states follow DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs` for the
  DeepSpeed strategies: w-byte weights (2 with bf16), fp32 gradient partition, fp32
  master weights and fp32 optimizer states, `4 x largest layer` of gathered ZeRO-3 params;
- `none`, `ddp` and `fsdp` keep what our loop keeps: weights, gradients and optimizer
  states in the model's dtype (fp32 by default; bf16 precision is autocast), LoRA weights
  in fp32 (PEFT upcasts adapters), and DDP's gradient buckets, a second copy of the grads;
- activations are the tensors autograd saves for one micro-batch, counted per layer from
  the architecture (docs/estimate.md), plus the loss's logits; with gradient checkpointing
  only each layer's input is kept, and one layer is recomputed at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from launcher.dist.strategies import STRATEGIES, Strategy
from launcher.errors import Problem, UserError
from launcher.train.optim import OPTIMIZERS

GIB = 1024**3
BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory


def optimizer_bytes(name: str, param_bytes: int) -> float:
    """Bytes of optimizer state per trainable parameter held in `param_bytes` bytes (the
    optimizer registry's own facts)."""
    o = OPTIMIZERS[name]
    return o.state_tensors * param_bytes + o.extra_bytes


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# LoRA target names of the Llama family, for facts typed on the command line
_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know about a model (counts, not weights)."""

    params: int  # every parameter, adapter included
    trainable: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    gated_mlp: bool = True  # SwiGLU-style MLP (gate and up projections) vs one up projection
    largest_layer: int = 0  # DeepSpeed's largest_layer_params: the biggest module's own weights
    block_params: int = 0  # one transformer block (what FSDP gathers at a time)
    quantizable: int = 0  # weights of the backbone's linear layers (what bitsandbytes packs)
    lora_inputs: int = 0  # features per token entering LoRA dropouts in one block
    attention: str = "sdpa"  # sdpa | eager | flash_attention_2
    attn_dropout: bool = False  # dropout on the attention probabilities (eager only)
    hidden_dropout: bool = False  # dropout on the residual branches (BERT-style)
    source: str = ""


@dataclass(frozen=True)
class Workload:
    """How the recipe trains: one micro-batch per device, dtypes, adapter, optimizer."""

    seq_len: int
    micro_batch: int
    model_dtype: str = "float32"
    precision: str = "fp32"  # fp32 | bf16 (autocast; DeepSpeed then keeps bf16 weights)
    adapter: str = "full"  # full | lora
    lora_dropout: float = 0.0
    quant_bits: int | None = None
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    optimizer: str = "adamw"
    # the loss is over vocabulary logits at every position (an upper bound: the loop
    # computes them only where the next token is a target, which depends on the data)
    lm_logits: bool = True


@dataclass(frozen=True)
class Hardware:
    gpus: int  # per machine
    gpu_mem_gib: float
    machines: int = 1
    cpu_mem_gib: float | None = None  # per machine; None: not checked

    @property
    def world(self) -> int:
        return self.gpus * self.machines


@dataclass(frozen=True)
class Row:
    """One strategy's per-GPU bytes (and CPU bytes per machine)."""

    strategy: str
    params: int
    grads: int
    optim: int
    activations: int
    activations_ckpt: int
    cpu: int
    candidate: bool  # considered for "cheapest that fits"
    note: str = ""

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optim

    @property
    def total(self) -> int:
        return self.states + self.activations

    @property
    def total_ckpt(self) -> int:
        return self.states + self.activations_ckpt


@dataclass(frozen=True)
class Choice:
    strategy: str
    gradient_checkpointing: bool

    def describe(self) -> str:
        ckpt = "with" if self.gradient_checkpointing else "without"
        return f"{self.strategy} ({ckpt} gradient checkpointing)"


@dataclass(frozen=True)
class Estimate:
    facts: ModelFacts
    workload: Workload
    hardware: Hardware
    rows: list[Row] = field(default_factory=list)
    cheapest: Choice | None = None

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.strategy == name)

    def fits(self, row: Row, ckpt: bool = False) -> bool:
        """`row` is a candidate and fits the GPU (and the CPU memory, when given)."""
        hw = self.hardware
        gpu_ok = (row.total_ckpt if ckpt else row.total) <= hw.gpu_mem_gib * GIB
        cpu_ok = hw.cpu_mem_gib is None or row.cpu <= hw.cpu_mem_gib * GIB
        return row.candidate and gpu_ok and cpu_ok

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `--json`: every size in bytes."""
        rows = []
        for r in self.rows:
            d = asdict(r)
            d.update(
                total=r.total,
                total_ckpt=r.total_ckpt,
                fits=self.fits(r),
                fits_ckpt=self.fits(r, ckpt=True),
            )
            rows.append(d)
        return {
            "unit": "bytes",
            "model": asdict(self.facts),
            "workload": asdict(self.workload),
            "hardware": asdict(self.hardware) | {"world": self.hardware.world},
            "strategies": rows,
            "cheapest": asdict(self.cheapest) if self.cheapest else None,
        }


# -- pure arithmetic ------------------------------------------------------------------------


def quant_bytes(bits: int, double_quant: bool = True) -> float:
    """Bytes per weight packed by bitsandbytes, its quantization constants included.

    4-bit: half a byte plus one absmax per block of 64 weights, fp32 (4/64 B), or with
    double quantization an 8-bit absmax (1/64 B) plus one fp32 constant per 256 blocks.
    8-bit (LLM.int8): one byte plus an fp32 scale per output row (negligible).
    """
    if bits == 8:
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def activation_bytes(facts: ModelFacts, work: Workload) -> tuple[int, int]:
    """Bytes autograd keeps for one micro-batch: (without, with) gradient checkpointing.

    Per token and transformer block, with e bytes per activation (2 under bf16 autocast or
    16-bit weights, else 4); the norms compute in fp32 whatever e is:
      two norms      2 x (4h + 2eh)  fp32 input, normalized output, scaled output
      attention      4eh             q, k, v (GQA heads repeated, as with padding), output
      MLP            4ei (gated: gate, act(gate), up, product) or 2ei (up, act(up))
      eager          e·a·s           softmax probabilities (SDPA/flash keep none of them)
      dropout        masks (1 B) and outputs of attention/residual/LoRA dropouts
    plus a final norm, and the loss: logits (e), fp32 log-probs, their gradient and the
    logits' fp32 gradient coexist when backward starts: V·(e + 12) bytes per token.
    LoRA adds, per adapted linear layer, its dropout's output and mask (dropout > 0) and an
    fp32 copy of a 16-bit input (PEFT keeps adapters in fp32).
    Checkpointing keeps each block's input (eh) and recomputes one block at a time (its
    activations, then as much again in gradients flowing through it), after the loss's
    buffers are gone: the peak is the larger of the two moments.
    """
    h, i, a, s = facts.hidden, facts.intermediate, facts.heads, work.seq_len
    e = 2 if _half_activations(work) else 4
    norm = 4 * h + 2 * e * h
    block = 2 * norm + 4 * e * h + (4 if facts.gated_mlp else 2) * e * i
    if facts.attention == "eager":
        block += e * a * s + ((1 + e) * a * s if facts.attn_dropout else 0)
    if facts.hidden_dropout:
        block += 2 * h  # masks; the outputs are the next norm's input
    if work.adapter == "lora" and work.lora_dropout > 0:
        block += (1 + e) * facts.lora_inputs  # each adapter's dropout output and mask
    if work.adapter == "lora" and work.quant_bits is None and work.model_dtype != "float32":
        block += 4 * facts.lora_inputs  # PEFT upcasts 16-bit inputs to its fp32 adapters
    logits = facts.vocab * (e + 12) if work.lm_logits else 0
    tokens = work.micro_batch * s
    full = tokens * (facts.layers * block + norm + logits)
    ckpt = tokens * (facts.layers * e * h + norm + max(logits, 2 * block))
    return full, ckpt


def _half_activations(work: Workload) -> bool:
    if work.quant_bits is not None:
        return work.compute_dtype != "float32" or work.precision == "bf16"
    return work.precision == "bf16" or work.model_dtype != "float32"


def model_states(
    strategy: Strategy, facts: ModelFacts, work: Workload, hw: Hardware
) -> tuple[int, int, int, int]:
    """Per-GPU (params, grads, optimizer states) and CPU bytes per machine for `strategy`."""
    n, m, world = hw.gpus, hw.machines, hw.world
    P, T = facts.params, facts.trainable
    wm = _BYTES[work.model_dtype]
    if strategy.kind == "deepspeed":
        # DeepSpeed casts the model to bf16 when precision is bf16 and keeps fp32 masters
        w = 2 if work.precision == "bf16" or wm == 2 else 4
        frozen = _frozen_bytes(P - T, facts, work, w)
        master = (4 + optimizer_bytes(work.optimizer, 4)) * T  # fp32 masters + states
        gathered = 2 * w * facts.largest_layer
        if strategy.offload:  # ZeRO-3 with params and optimizer on the CPU
            cpu = (frozen + w * T + 4 * T + master) / m * BUFFER
            return gathered, 0, 0, int(cpu)
        if strategy.zero_stage == 3:
            cpu = facts.largest_layer * 4 * n * BUFFER  # zero.Init: each rank builds a slice
            if work.quant_bits is not None:  # no zero.Init for quantized: whole packed model
                cpu = (frozen + w * T) * n * BUFFER
            return (
                int((frozen + w * T) / world + gathered),
                4 * T // world,
                master // world,
                int(cpu),
            )
        cpu = P * 4 * n * BUFFER  # every rank loads the whole model in fp32
        grads = (w + 4) * T // world if strategy.zero_stage == 2 else w * T + 4 * T // world
        return int(frozen + w * T), int(grads), master // world, int(cpu)
    # none / ddp / fsdp: the loop's own dtypes; LoRA weights are fp32 (PEFT upcasts them)
    t = 4 if work.adapter == "lora" else wm
    frozen = _frozen_bytes(P - T, facts, work, wm)
    cpu = int(P * wm * n * BUFFER)
    if strategy.kind == "fsdp":
        compute = 2 if work.precision == "bf16" else wm
        gathered = 2 * compute * facts.block_params  # the current unit and the prefetched one
        opt = int(optimizer_bytes(work.optimizer, t) * T) // world
        return int((frozen + t * T) / world + gathered), t * T // world, opt, cpu
    buckets = 2 if strategy.kind == "ddp" else 1  # DDP reduces through a copy of the grads
    return int(frozen + t * T), buckets * t * T, int(optimizer_bytes(work.optimizer, t) * T), cpu


def _frozen_bytes(frozen: int, facts: ModelFacts, work: Workload, w: int) -> float:
    """Bytes of the weights nobody trains; quantized ones are packed, the rest fp32 (PEFT)."""
    if work.quant_bits is None:
        return frozen * w
    packed = min(facts.quantizable, frozen)
    return packed * quant_bytes(work.quant_bits, work.double_quant) + (frozen - packed) * 4


def _blocked(name: str, work: Workload) -> str:
    """Why `name` cannot run this workload ("" if it can); the recipe checks say the same."""
    if work.quant_bits == 8 and STRATEGIES[name].kind == "fsdp":
        return "n/a: FSDP2 cannot shard 8-bit weights"
    return ""


def _candidates(hw: Hardware, work: Workload) -> list[str]:
    """Strategies worth trying, cheapest first (docs/estimate.md gives the reasons)."""
    if hw.world == 1:
        names = ["none"]
    else:
        names = ["ddp", "zero1", "zero2", "zero3", "fsdp"]
    return [n for n in names if not _blocked(n, work)]


def estimate(facts: ModelFacts, work: Workload, hw: Hardware) -> Estimate:
    """Memory of every strategy for this model, workload and hardware, and the cheapest fit."""
    if work.optimizer not in OPTIMIZERS:
        raise UserError(
            Problem(f"unknown optimizer {work.optimizer!r}", key="train.optimizer",
                    hint=f"one of: {', '.join(OPTIMIZERS)}")
        )
    act, act_ckpt = activation_bytes(facts, work)
    plain = _candidates(hw, work)
    offload = ["zero3_offload"]
    rows = []
    for name, strategy in STRATEGIES.items():
        params, grads, optim, cpu = model_states(strategy, facts, work, hw)
        note = _blocked(name, work)
        if not note and name == "none" and hw.world > 1:
            note = "one process: uses 1 GPU"
        elif not note and name not in plain + offload:
            note = "no gain on 1 GPU"
        rows.append(
            Row(name, params, grads, optim, act, act_ckpt, cpu, name in plain + offload, note)
        )
    result = Estimate(facts, work, hw, rows)
    # sharding before recomputation (checkpointing costs ~1/3 more compute), and offloading
    # (PCIe-bound) only when nothing else fits
    order = [(n, False) for n in plain] + [(n, True) for n in plain]
    order += [(n, c) for n in offload for c in (False, True)]
    for name, ckpt in order:
        if result.fits(result.row(name), ckpt):
            return Estimate(facts, work, hw, rows, Choice(name, ckpt))
    return result


# -- facts from the command line ----------------------------------------------------------


def _llama_targets(target: list[str] | str) -> list[str]:
    """The Llama projections that an adapter's target_modules names (a regex sees full paths)."""
    if target == "all-linear":
        return list(_LLAMA_LINEARS)
    if isinstance(target, str):
        import re

        def path(name: str) -> str:
            return f"model.layers.0.{'mlp' if name in _LLAMA_MLP else 'self_attn'}.{name}"

        return [n for n in _LLAMA_LINEARS if re.fullmatch(target, path(n))]
    return list(target)


def facts_from_numbers(
    params: int,
    layers: int,
    hidden: int,
    vocab: int,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    adapter: Any = None,
) -> ModelFacts:
    """Facts of a Llama-style decoder (gated MLP, untied embeddings) from a few numbers.

    `intermediate` defaults to what `params` implies; `adapter` is the recipe's AdapterCfg
    (LoRA parameters are counted on the Llama projections it targets).
    """
    heads = heads or max(1, hidden // 128)
    kv = (kv_heads or heads) * (hidden // heads)  # width of k and v
    attn = 2 * hidden * hidden + 2 * hidden * kv
    if intermediate is None:
        per_block = (params - 2 * vocab * hidden) / layers - attn
        intermediate = max(hidden, round(per_block / (3 * hidden)))
    block = attn + 3 * hidden * intermediate
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    trainable, lora_inputs = params, 0
    if adapter is not None and adapter.enabled:
        names = _llama_targets(adapter.target_modules)
        unknown = [t for t in names if t not in shapes]
        if unknown:
            raise UserError(
                Problem(
                    f"cannot count LoRA parameters for {unknown} from numbers alone",
                    key="adapter.target_modules",
                    hint="use --model-config path/to/config.json, or Llama names: "
                    + ", ".join(_LLAMA_LINEARS),
                )
            )
        trainable = layers * sum(adapter.r * (shapes[t][0] + shapes[t][1]) for t in names)
        lora_inputs = sum(shapes[t][0] for t in names)
        params += trainable
    return ModelFacts(
        params=int(params),
        trainable=int(trainable),
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=vocab,
        intermediate=int(intermediate),
        largest_layer=vocab * hidden,
        block_params=int(block),
        quantizable=int(layers * block),
        lora_inputs=int(lora_inputs),
        source="command line",
    )
