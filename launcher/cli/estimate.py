"""`ftl estimate RECIPE --gpus N --gpu-mem GB`: per-GPU memory of every strategy.

Prints one row per strategy (parameters, gradients, optimizer states, activations with
and without gradient checkpointing, total) and the cheapest strategy that fits; `--json`
prints the same as data. Exit 0 when something fits, 1 when nothing does, 2 on a user
error. Nothing is downloaded: the model's facts come from its config (local folder,
`pkg:` path or the Hugging Face cache), `--model-config`, or `--params` and friends.
"""

from __future__ import annotations

import argparse
import json

from launcher.cli.validate import add_recipe_arguments
from launcher.errors import Problem, UserError


def _count(text: str) -> int:
    """A positive count, also written like 8e9 or 8_000_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    hw = p.add_argument_group("hardware")
    hw.add_argument(
        "--gpus",
        type=_count,
        default=None,
        help="GPUs per machine (default: distributed.num_processes if set, else 1)",
    )
    hw.add_argument("--gpu-mem", type=float, required=True, metavar="GB", help="GiB per GPU")
    hw.add_argument(
        "--cpu-mem",
        type=float,
        metavar="GB",
        help="GiB of CPU memory per machine; when given, a strategy must fit it too",
    )
    hw.add_argument(
        "--num-machines",
        type=_count,
        default=None,
        help="machines (default: distributed.num_machines)",
    )
    facts = p.add_argument_group(
        "model facts without the model (instead of reading model.name_or_path)"
    )
    facts.add_argument("--model-config", metavar="PATH", help="a config.json (or its folder)")
    facts.add_argument("--params", type=_count, help="total parameters, e.g. 8e9")
    facts.add_argument("--layers", type=_count, help="transformer blocks")
    facts.add_argument("--hidden", type=_count, help="hidden size")
    facts.add_argument("--vocab", type=_count, help="vocabulary size")
    facts.add_argument("--heads", type=_count, help="attention heads (default: hidden/128)")
    facts.add_argument("--kv-heads", type=_count, help="key/value heads (default: --heads)")
    facts.add_argument(
        "--intermediate", type=_count, help="MLP width (default: what --params implies)"
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from launcher.dist import estimate as est
    from launcher.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.override)
    hw = _hardware(args, recipe)
    facts = _facts(args, recipe)
    work = est.Workload(
        seq_len=recipe.data.max_length,
        micro_batch=recipe.train.micro_batch_size,
        model_dtype=recipe.model.dtype,
        precision=recipe.train.precision,
        adapter="lora" if recipe.adapter.enabled else "full",
        lora_dropout=recipe.adapter.dropout,
        quant_bits=recipe.quant.bits,
        double_quant=recipe.quant.double_quant,
        compute_dtype=recipe.quant.compute_dtype,
        optimizer=recipe.train.optimizer,
        lm_logits=recipe.task == "causal_lm",
    )
    result = est.estimate(facts, work, hw)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result, args.recipe))
    return 0 if result.cheapest else 1


def _hardware(args: argparse.Namespace, recipe: object) -> object:
    from launcher.dist.estimate import Hardware

    dist = recipe.distributed  # type: ignore[attr-defined]
    gpus = args.gpus or (dist.num_processes if isinstance(dist.num_processes, int) else 1)
    if not args.gpu_mem > 0:
        raise UserError(Problem(f"--gpu-mem must be above 0 GiB, got {args.gpu_mem}"))
    if args.cpu_mem is not None and not args.cpu_mem > 0:
        raise UserError(Problem(f"--cpu-mem must be above 0 GiB, got {args.cpu_mem}"))
    return Hardware(
        gpus=gpus,
        gpu_mem_gib=args.gpu_mem,
        machines=args.num_machines or dist.num_machines,
        cpu_mem_gib=args.cpu_mem,
    )


def _facts(args: argparse.Namespace, recipe: object) -> object:
    from launcher.dist import estimate as est

    numbers = {k: getattr(args, k) for k in ("params", "layers", "hidden", "vocab")}
    extra = {k: getattr(args, k) for k in ("heads", "kv_heads", "intermediate")}
    given = [k for k, v in (numbers | extra).items() if v is not None]
    if not given:
        from launcher.models.facts import facts_from_recipe

        return facts_from_recipe(recipe, args.model_config)
    missing = [f"--{k}" for k, v in numbers.items() if v is None]
    if missing or args.model_config:
        raise UserError(
            Problem(
                "model facts on the command line need --params, --layers, --hidden and "
                f"--vocab together{'' if not missing else ' (missing: ' + ', '.join(missing) + ')'}"
                + (", and no --model-config" if args.model_config else ""),
                hint="e.g. --params 8e9 --layers 32 --hidden 4096 --vocab 128256 [--heads 32]",
            )
        )
    if args.kv_heads and not args.heads:
        raise UserError(Problem("--kv-heads needs --heads", hint="e.g. --heads 32 --kv-heads 8"))
    if args.heads and args.hidden % args.heads:
        raise UserError(
            Problem(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
        )
    return est.facts_from_numbers(
        args.params,
        args.layers,
        args.hidden,
        args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        adapter=recipe.adapter,  # type: ignore[attr-defined]
    )


def _fmt(nbytes: int) -> str:
    from launcher.dist.estimate import GIB

    return f"{nbytes / GIB:.2f}"


def render(result: object, recipe_path: str) -> str:
    """The human table: GiB per GPU, one row per strategy, then the verdict."""
    from launcher.dist.estimate import Estimate

    assert isinstance(result, Estimate)
    f, w, hw = result.facts, result.workload, result.hardware
    adapter = f"{w.adapter}" + (f", {w.quant_bits}-bit base" if w.quant_bits else "")
    lines = [
        f"# {recipe_path}: {f.params / 1e6:,.1f}M parameters, {f.trainable / 1e6:,.1f}M "
        f"trainable ({adapter}); {f.layers} layers, hidden {f.hidden}, vocab {f.vocab}",
        f"# micro-batch {w.micro_batch} x {w.seq_len} tokens per GPU, model {w.model_dtype}, "
        f"precision {w.precision}, optimizer {w.optimizer}; {hw.gpus} GPU(s) x "
        f"{hw.machines} machine(s) = {hw.world}, {hw.gpu_mem_gib:g} GiB each"
        + (f", {hw.cpu_mem_gib:g} GiB CPU memory per machine" if hw.cpu_mem_gib else ""),
        "# GiB per GPU (CPU: GiB per machine); facts from " + (f.source or "?"),
    ]
    head = ("strategy", "params", "grads", "optim", "activ", "act+ckpt", "total", "tot+ckpt")
    head += ("cpu", "fits")
    table = [head]
    for r in result.rows:
        if not r.candidate:
            fits = "-"
        elif result.fits(r):
            fits = "yes"
        elif result.fits(r, ckpt=True):
            fits = "with ckpt"
        else:
            fits = "no"
        cells = (r.params, r.grads, r.optim, r.activations, r.activations_ckpt, r.total)
        cells += (r.total_ckpt, r.cpu)
        table.append(
            (r.strategy, *(_fmt(c) for c in cells), fits + (f"  ({r.note})" if r.note else ""))
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        cols = [row[0].ljust(widths[0])] + [
            c.rjust(wd) for c, wd in zip(row[1:-1], widths[1:], strict=True)
        ]
        lines.append("  ".join(cols + [row[-1]]))
    if result.cheapest:
        lines.append(f"cheapest that fits: {result.cheapest.describe()}")
    else:
        tips = []
        if w.adapter == "full":
            tips.append("adapter.type=lora")
        if w.quant_bits is None:
            tips.append("quant.bits=4 with LoRA (QLoRA)")
        tips += ["a smaller train.micro_batch_size or data.max_length", "more GPUs"]
        cpu = f" and {hw.cpu_mem_gib:g} GiB per machine" if hw.cpu_mem_gib else ""
        lines.append(
            f"nothing fits in {hw.gpu_mem_gib:g} GiB per GPU{cpu}; try: " + "; ".join(tips)
        )
    return "\n".join(lines)
