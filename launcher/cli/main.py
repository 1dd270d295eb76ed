"""`ftl`: parse the verb, run it, map user errors to exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from launcher import __version__
from launcher.errors import UserError

# verb -> (module, one-line help); modules are imported only when their verb runs,
# so `ftl --help` stays instant.
VERBS: dict[str, tuple[str, str]] = {
    "train": (
        "launcher.cli.train",
        "fine-tune a model from a recipe (one process, or under accelerate launch)",
    ),
    "launch": (
        "launcher.cli.launch",
        "run a recipe on several processes / machines (DDP, DeepSpeed ZeRO, FSDP2)",
    ),
    "slurm": (
        "launcher.cli.slurm",
        "submit a recipe as a SLURM batch job (multi-node, checkpoint and requeue on preemption)",
    ),
    "status": ("launcher.cli.status", "where a run stands: job, step, checkpoint, restarts"),
    "shard": (
        "launcher.tools.shard",
        "split JSONL/CSV/Parquet/HF datasets into N balanced, shuffled shards with a manifest",
    ),
    "preprocess": (
        "launcher.cli.preprocess",
        "format, tokenize and mask a recipe's data into the content-hashed cache ftl train loads",
    ),
    "merge": (
        "launcher.tools.merge",
        "fold a LoRA/DoRA adapter into its base, shard by shard (bounded memory)",
    ),
    "convert": (
        "launcher.tools.convert",
        "ZeRO or FSDP training checkpoint -> Hugging Face safetensors (or a PEFT adapter)",
    ),
    "export": (
        "launcher.tools.export",
        "a serving bundle: hf (merged, safetensors, tokenizer, generation config), vllm-lora",
    ),
    "estimate": (
        "launcher.cli.estimate",
        "per-device memory of a recipe for every strategy, and the cheapest that fits",
    ),
    "validate": ("launcher.cli.validate", "check a recipe and print it fully resolved"),
    "env": ("launcher.cli.env", "this machine's CPU, GPUs and library versions (for bug reports)"),
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    parser = argparse.ArgumentParser(
        prog="ftl",
        description="ftl, the fine-tuning launcher: one YAML recipe in, one fine-tuned model out.",
    )
    parser.add_argument("--version", action="version", version=f"ftl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for verb, (module, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == wanted:  # only the chosen verb's module is imported
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            runners[verb] = mod.run
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return runners[args.verb](args) or 0
    except UserError as e:
        print(f"ftl {args.verb}: error: {e.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftl {args.verb}: interrupted", file=sys.stderr)
        return 130


def standalone(verb: str, argv: list[str] | None = None) -> int:
    """`tools/<script>.py ARGS` is `ftl VERB ARGS`: one parser, the same `ftl VERB: error:`
    message and exit code 2 for a user error, whichever way it is called."""
    return main([verb, *(sys.argv[1:] if argv is None else argv)])


def _exit_rank(code: int) -> None:
    """Leave a process of a multi-process run without running C++ static destructors.

    Once the run is over (process group destroyed, files closed), interpreter shutdown can
    still abort a rank with "terminate called without an active exception" (a native
    thread torn down at exit), which torchrun reports as a failed run. Nothing is left to
    clean up at this point, so skip that phase.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_exit(code: int) -> None:
    """Under `ftl launch`, leave this rank's exit code where the launcher can read it:
    torchrun turns any failing rank into exit 1, ftl's codes (2 user error, 3 stopped)
    would be lost."""
    import contextlib
    import os
    from pathlib import Path

    from launcher.dist.contract import ENV_LAUNCH_DIR

    folder, rank = os.environ.get(ENV_LAUNCH_DIR), os.environ.get("RANK")
    if folder and rank is not None and Path(folder).is_dir():
        with contextlib.suppress(OSError):
            Path(folder, f"exit-{rank}").write_text(str(code))


if __name__ == "__main__":
    import os

    code = main()
    _report_exit(code)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _exit_rank(code)
    raise SystemExit(code)
