"""Rules that span several keys, checked after the schema accepts each key on its own.

Each rule looks at a typed `Recipe` and yields `(dotted key, message, hint)`; none of
them changes anything. `load_recipe` reports every hit at once.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterator

from launcher.dist.strategies import STRATEGIES
from launcher.recipe.schema import Recipe
from launcher.train.tasks import TASKS

Hit = tuple[str, str, str]


def _format_fits_task(r: Recipe) -> Iterator[Hit]:
    formats = TASKS[r.task].formats
    if r.data.format not in formats:
        yield (
            "data.format",
            f"format '{r.data.format}' does not fit task '{r.task}'",
            f"task '{r.task}' takes: {', '.join(formats)}",
        )


def _quant_needs_adapter(r: Recipe) -> Iterator[Hit]:
    if r.quant.bits is not None and not r.adapter.enabled:
        yield (
            "quant.bits",
            "quantized weights cannot be fully fine-tuned",
            "set adapter.type: lora (QLoRA), or remove quant.bits",
        )


def _one_eval_source(r: Recipe) -> Iterator[Hit]:
    if r.data.eval is not None and r.data.eval_split:
        yield (
            "data.eval_split",
            "data.eval and data.eval_split are both set",
            "keep one: an eval file, or a fraction of data.train to hold out",
        )


def _one_warmup(r: Recipe) -> Iterator[Hit]:
    if r.train.warmup_steps and r.train.warmup_ratio:
        yield (
            "train.warmup_ratio",
            "train.warmup_steps and train.warmup_ratio are both set",
            "keep one of them",
        )


def _eval_needs_data(r: Recipe) -> Iterator[Hit]:
    has_eval = r.data.eval is not None or r.data.eval_split > 0
    if r.train.early_stopping is not None and not has_eval:
        yield (
            "train.early_stopping",
            "early stopping needs eval data",
            "set data.eval or data.eval_split",
        )
    if r.train.eval_at_start and not has_eval:
        yield (
            "train.eval_at_start",
            "eval_at_start is set but there is no eval data",
            "set data.eval or data.eval_split",
        )
    if r.train.eval_every is not None and not has_eval:
        yield (
            "train.eval_every",
            "eval_every is set but there is no eval data",
            "set data.eval or data.eval_split, or remove train.eval_every",
        )


def _l2sp_needs_pretrained_weights(r: Recipe) -> Iterator[Hit]:
    if r.train.l2sp and r.adapter.enabled:
        yield (
            "train.l2sp",
            f"L2-SP regularises trained pretrained weights; with adapter.type "
            f"{r.adapter.type} they are frozen (the adapter matrices are new)",
            "use adapter.type: full with L2-SP, or set train.l2sp: 0",
        )


def _early_stopping_needs_evals(r: Recipe) -> Iterator[Hit]:
    if r.train.early_stopping is not None and r.train.eval_every is None:
        yield (
            "train.early_stopping",
            "early stopping watches periodic evals, but train.eval_every is not set",
            "set train.eval_every: N",
        )


def _prompt_template_fields(r: Recipe) -> Iterator[Hit]:
    if r.data.prompt_template is None:
        return
    allowed = {"instruction", "input", "with_input", "input_block"}
    try:
        used = {
            name
            for _, name, _, _ in string.Formatter().parse(r.data.prompt_template)
            if name is not None
        }
    except ValueError as e:
        yield (
            "data.prompt_template",
            f"not a valid template: {e}",
            "write literal braces as {{ and }}",
        )
        return
    unknown = sorted(used - allowed)
    if unknown:
        yield (
            "data.prompt_template",
            f"unknown placeholder(s): {', '.join(unknown)}",
            "use {instruction}, {input}, {input_block}, {with_input}; literal braces as {{ }}",
        )


def _gguf_is_local(r: Recipe) -> Iterator[Hit]:
    if r.model.gguf_file and r.quant.bits is not None:
        yield (
            "quant.bits",
            "a GGUF model is dequantized on load and cannot be re-quantized",
            "remove quant.bits, or point model.name_or_path at an HF checkpoint",
        )


def _early_stopping_metric(r: Recipe) -> Iterator[Hit]:
    es = r.train.early_stopping
    if es is not None:
        known = TASKS[r.task].metrics
        if es.metric not in known:
            yield (
                "train.early_stopping.metric",
                f"unknown metric '{es.metric}' for task '{r.task}'",
                f"one of: {', '.join(known)}",
            )


def _task_settings(r: Recipe) -> Iterator[Hit]:
    """Settings that only some tasks use are errors elsewhere, never silently ignored."""
    from launcher.recipe.schema import GenerationCfg

    task = TASKS[r.task]
    if r.train.label_smoothing and task.smoothed_loss is None:
        yield (
            "train.label_smoothing",
            f"task '{r.task}' has no cross-entropy over classes to smooth",
            "remove train.label_smoothing (it applies to causal_lm, sequence_classification, "
            "token_classification and seq2seq)",
        )
    if not task.generates and r.train.generation != GenerationCfg():
        yield (
            "train.generation",
            f"task '{r.task}' does not generate text in its evals",
            "remove train.generation (it sets seq2seq eval generation)",
        )
    if r.data.packing and task.name != "causal_lm":
        yield (
            "data.packing",
            f"packing joins causal-LM examples; task '{r.task}' has one label per example",
            "remove data.packing",
        )
    if r.data.train_on_prompt and r.data.format not in ("chat", "alpaca"):
        yield (
            "data.train_on_prompt",
            f"format '{r.data.format}' has no prompt to train on or leave out",
            "remove data.train_on_prompt (it applies to format chat and alpaca)",
        )
    if r.data.padding_free is not None and not r.data.packing:
        yield (
            "data.padding_free",
            "padding-free micro-batches are a way of packing, and packing is off",
            "set data.packing: true, or remove data.padding_free",
        )
    if task.label_kind == "score" and r.data.labels is not None:
        yield (
            "data.labels",
            "a regression target is a number: it has no label set",
            "remove data.labels, or use task: sequence_classification for classes",
        )


def _streaming(r: Recipe) -> Iterator[Hit]:
    """Streaming reads data.train as it trains: what needs the whole set up front cannot."""
    d = r.data
    if not d.streaming:
        return
    if r.task != "causal_lm" or d.format not in ("completion", "alpaca", "chat"):
        yield (
            "data.streaming",
            f"streaming packs causal-LM text; task '{r.task}' with format '{d.format}' is not that",
            "use task: causal_lm with format completion, alpaca or chat, or remove data.streaming",
        )
    if r.train.max_steps is None:
        yield (
            "train.max_steps",
            "a stream has no length known in advance, so epochs cannot set the run",
            "set train.max_steps",
        )
    if d.eval_split:
        yield (
            "data.eval_split",
            "a stream cannot hold rows out before it reads them",
            "give an eval file (data.eval)",
        )

    if d.max_samples is not None:
        yield ("data.max_samples", "a stream is not cut by rows", "use train.max_steps")


def _one_batch_size(r: Recipe) -> Iterator[Hit]:
    if r.train.global_batch_size is not None and r.train.grad_accum != 1:
        yield (
            "train.global_batch_size",
            "train.global_batch_size and train.grad_accum are both set",
            "keep one: global_batch_size derives grad_accum from the number of processes",
        )
    elif r.train.global_batch_size is not None and (
        r.train.global_batch_size % r.train.micro_batch_size
    ):
        yield (
            "train.global_batch_size",
            f"global batch {r.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {r.train.micro_batch_size}",
            "make it micro_batch_size x grad accumulation x number of processes",
        )


def _deepspeed_config_needs_zero(r: Recipe) -> Iterator[Hit]:
    kind = STRATEGIES[r.distributed.strategy].kind
    if r.distributed.deepspeed_config is not None and kind != "deepspeed":
        what = (
            "FSDP and DeepSpeed are both set"
            if kind == "fsdp"
            else (f"a DeepSpeed config is set but distributed.strategy is {r.distributed.strategy}")
        )
        yield (
            "distributed.deepspeed_config",
            what,
            "pick one engine: strategy zero1|zero2|zero3|zero3_offload with your "
            "deepspeed_config, or strategy fsdp/ddp without it",
        )


def _sharding_keeps_whole_tensors(r: Recipe) -> Iterator[Hit]:
    strategy = STRATEGIES[r.distributed.strategy]
    if strategy.shards_params and r.train.l2sp:
        yield (
            "train.l2sp",
            f"L2-SP needs every whole weight on each rank; strategy {strategy.name} shards them",
            "use strategy ddp, zero1 or zero2 with L2-SP, or set train.l2sp: 0",
        )


def _quant_fits_strategy(r: Recipe) -> Iterator[Hit]:
    """What bitsandbytes weights survive, per strategy (each case run on CPU, 2 ranks)."""
    strategy, q = STRATEGIES[r.distributed.strategy], r.quant
    if q.bits is not None and r.adapter.type == "dora" and (strategy.zero_stage or 0) >= 2:
        why = (
            "DoRA reads each whole quantized base weight to compute its norm, outside "
            "ZeRO-3's gather (the forward fails)"
            if strategy.shards_params
            else "DeepSpeed's ZeRO-2 checkpoint cannot find DoRA's quantized frozen weights "
            "(the first checkpoint fails)"
        )
        yield (
            "adapter.type",
            f"DoRA on a {q.bits}-bit base under {strategy.name}: {why}",
            "use strategy fsdp, ddp or zero1 for QDoRA, or adapter.type: lora",
        )
    if q.bits == 8 and strategy.kind == "fsdp":
        yield (
            "quant.bits",
            "8-bit weights cannot be sharded by FSDP2: LLM.int8 keeps each weight's scales "
            "on the parameter object, which FSDP2 replaces with a sharded tensor (the forward "
            "then fails)",
            "use quant.bits: 4 with fsdp (QLoRA), or 8-bit with strategy zero3 or ddp",
        )
    if q.bits == 8 and q.quant_storage != "auto":
        yield (
            "quant.quant_storage",
            "quant_storage holds packed 4-bit weights; 8-bit weights are int8 tensors",
            "remove quant.quant_storage, or set quant.bits: 4",
        )
    if (
        q.bits == 4
        and strategy.shards_params
        and r.train.precision == "bf16"
        and q.quant_storage in ("float32", "float16")
    ):
        yield (
            "quant.quant_storage",
            f"strategy {strategy.name} with train.precision bf16 casts float parameters to "
            f"bfloat16, which scrambles 4-bit weights packed into {q.quant_storage}",
            "set quant.quant_storage: auto (bfloat16 here), bfloat16 or uint8",
        )


def _machines_need_distribution(r: Recipe) -> Iterator[Hit]:
    if r.distributed.num_machines > 1 and r.distributed.strategy == "none":
        yield (
            "distributed.num_machines",
            f"{r.distributed.num_machines} machines but distributed.strategy is none",
            "set distributed.strategy: ddp (or a ZeRO stage / fsdp)",
        )


def _slurm_values_are_one_line(r: Recipe) -> Iterator[Hit]:
    """Values become #SBATCH lines and exported variables: a line break would end the
    directive and turn the rest into a command of the batch script."""
    if r.slurm is None:
        return
    values: list[tuple[str, str]] = [
        (f"slurm.{k}", v) for k, v in r.slurm.model_dump().items() if isinstance(v, str)
    ]
    values += [(f"slurm.env.{k}", v) for k, v in r.slurm.env.items()]
    values += [(f"slurm.sbatch_args[{i}]", v) for i, v in enumerate(r.slurm.sbatch_args)]
    for key, value in values:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            yield key, "holds a line break or another control character", "write it on one line"
    for i, arg in enumerate(r.slurm.sbatch_args):
        if not arg.startswith("--") or len(arg) < 3:
            yield (
                f"slurm.sbatch_args[{i}]",
                f"{arg!r} is not a long sbatch option",
                "write each option as --name=value, e.g. --mail-type=END",
            )
    for name in r.slurm.env:
        if not name.isidentifier() or not name.isascii():
            yield f"slurm.env.{name}", "is not a valid variable name", "use letters, digits, _"


RULES: list[Callable[[Recipe], Iterator[Hit]]] = [
    _format_fits_task,
    _quant_needs_adapter,
    _one_eval_source,
    _one_warmup,
    _eval_needs_data,
    _gguf_is_local,
    _prompt_template_fields,
    _l2sp_needs_pretrained_weights,
    _early_stopping_needs_evals,
    _early_stopping_metric,
    _task_settings,
    _streaming,
    _one_batch_size,
    _deepspeed_config_needs_zero,
    _sharding_keeps_whole_tensors,
    _quant_fits_strategy,
    _machines_need_distribution,
    _slurm_values_are_one_line,
]


def check(recipe: Recipe) -> list[Hit]:
    """Every cross-key problem of `recipe`."""
    return [hit for rule in RULES for hit in rule(recipe)]
