"""ftl sample packing vs TRL's SFTTrainer on CPU: non-padding tokens/s and peak memory, padded
and packed, in one run.

    python bench/packing_vs_trl.py [--steps 12] [--skip 2] [--passes 1] [--reverse]
        [--wait-idle 600] [--threads N] [--live-memory]

Four sides, each a fresh process, on the same work: LoRA r 16 (alpha 32, dropout 0.05) on
every linear layer of SmolLM2-135M-Instruct in float32 (the plain HF folder that
bench/adapters_cpu.py converts from the PyPI GGUF once), chat SFT on the BBC
headline/topic conversations of tools/make_bbc_chat.py, micro batch 4, max length 512,
AdamW lr 1e-3, cosine schedule with 2 warm-up steps, clipping 1.0, seed 42, the same
number of optimizer steps, no eval, nothing saved:

- ftl-padded: `ftl train RECIPE -o data.packing=false` (one example per row, padded to
  the longest of the micro-batch);
- ftl-packed: `ftl train RECIPE -o data.packing=true` (ftl's default packing on CPU:
  padding-free, best-fit decreasing into bins of 4 x 512 tokens, each bin one row that is
  the whole micro-batch, position ids restarting per example, attention per segment, no
  padding; `-o data.padding_free=false` would give 4 rows of 512 instead);
- ftl-packed-all: the same with `-o data.train_on_prompt=true`: the loss on every token,
  as TRL's default for `messages` data (ftl's default learns the assistant turns only,
  and computes vocabulary logits only where it learns, so this side is the
  like-for-like comparison with TRL);
- trl-padded: bench/trl_sft.py, `SFTConfig(packing=False, max_length=512, ...)`;
- trl-packed: bench/trl_sft.py --packing, `SFTConfig(packing=True, max_length=512, ...)`
  (TRL 1.16's defaults: BFD packing, padding-free batches).

A micro-batch is 4 rows of up to 512 tokens (ftl packed: one row of up to 2048), so the
packed sides see ~20 examples and ~5x the tokens per step: tokens/s is the fair
comparison, not steps/s. Every ftl side computes the vocabulary logits only where the next
token is a target (`logits_to_keep`), as every ftl causal-LM run does.

Measured per side: non-padding tokens/s (the tokens the model really sees) over the steps
after `--skip` warm-up steps, from the end of step `skip` to the end of the last step, and
over the whole loop; examples/s the same way; peak RSS (`VmHWM` from /proc/self/status at
the end of the process: ftl runs as `python -c` around `launcher.cli.main.main`, the same
entry point as the `ftl` script, and reads it after `ftl train` returns); the loss of every
step; the packing efficiency of the packed sides (ftl: `data.packing_efficiency` of
summary.json; TRL: tokens / (rows x 512) of its packed dataset).

ftl's per-step times come from metrics.jsonl (`train.log_every=1`): each `train` record
holds `tokens_per_s` and `samples_per_s` of its step, not its duration. The driver rebuilds
ftl's micro-batches (ftl's reader, chat format, packing and batch order, as
bench/trainer_adapters.py does) to know each step's tokens and examples, takes the step's
seconds as tokens / tokens_per_s, and checks that examples / samples_per_s gives the same
seconds and that the totals match summary.json (a packed micro-batch of 4 rows holds ~20
examples, so micro_batch_size / samples_per_s, as bench/adapters_cpu.py uses for
unpacked runs, would be wrong here). TRL's come from a `TrainerCallback`, its token counts
from the batch each `training_step` receives.

Prints a Markdown table and the ratios ftl-packed / trl-padded, ftl-packed / trl-packed
and ftl-packed / ftl-padded; writes every number to .cache/bench/packing_vs_trl.json;
figures go to docs/benchmarks.md. Sides alternate with `--passes` (the order reverses
every pass; `--reverse` starts reversed). Run it on an idle machine, or with
`--wait-idle` (and `--threads 1` where other work keeps cores busy; see
bench/adapters_cpu.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters_cpu import (  # noqa: E402  (bench/ is not a package)
    CACHE,
    DATA_DIR,
    LORA,
    MODEL_DIR,
    RECIPE,
    ROOT,
    _env,
    _run,
    _steady,
    prepare,
    wait_idle,
)

SIDES = ["ftl-packed", "ftl-packed-all", "trl-packed", "trl-padded", "ftl-padded"]

# `ftl train ...` in this process, then its peak RSS (VmHWM) to $BENCH_VMHWM_FILE
FTL_MAIN = """\
import json, os, sys
from launcher.cli.main import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read().splitlines()
kb = next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
with open(os.environ["BENCH_VMHWM_FILE"], "w") as f:
    json.dump({"vmhwm_mb": kb / 1024, "rc": rc}, f)
raise SystemExit(rc)
"""


def ftl_overrides(packed: bool, lr: float, all_tokens: bool = False) -> list[str]:
    extra = ["data.train_on_prompt=true"] if all_tokens else []
    return [*LORA, f"train.lr={lr}", f"data.packing={'true' if packed else 'false'}", *extra]


def ftl_plan(recipe: Path, overrides: list[str], steps: int) -> dict:
    """ftl's micro-batches of the first `steps` steps, rebuilt as ftl builds them: real tokens,
    examples and loss tokens of every step."""
    from launcher.data.batches import epoch_batches, padding_free
    from launcher.data.build import load_datasets
    from launcher.data.pack import pack
    from launcher.models.build import load_tokenizer
    from launcher.recipe import load_recipe

    r = load_recipe(str(recipe), overrides)
    tok = load_tokenizer(r.model, needs_eos=True)
    data = load_datasets(r.data, tok, label_kind="tokens")
    examples = data.train
    micro = r.train.micro_batch_size
    flat = r.data.packing and padding_free(r, "cpu")  # one row of micro x max_length a step
    per_bin = micro if flat else 1
    rows, stats = pack(examples, r.data.max_length, per_bin) if r.data.packing else (examples, {})
    batches = epoch_batches(len(rows), 1 if flat else micro, r.train.seed, 0)[:steps]

    def loss_tokens(row: dict) -> int:  # targets after the causal shift
        return sum(1 for x in row["labels"][1:] if x != -100)

    return {
        "step_tokens": [sum(len(rows[i]["input_ids"]) for i in b) for b in batches],
        "step_examples": [sum(rows[i].get("n_examples", 1) for i in b) for b in batches],
        "step_loss_tokens": [sum(loss_tokens(rows[i]) for i in b) for b in batches],
        # what the model computes, pad included: every row padded to the longest
        "step_padded_tokens": [len(b) * max(len(rows[i]["input_ids"]) for i in b) for b in batches],
        "examples": len(examples),
        "mean_example_tokens": round(sum(len(e["input_ids"]) for e in examples) / len(examples), 2),
        "packing": stats,
    }


def run_ftl(
    recipe: Path, packed: bool, out: Path, args, env: dict[str, str], all_tokens: bool = False
) -> dict:
    overrides = ftl_overrides(packed, args.lr, all_tokens)
    plan = ftl_plan(recipe, overrides, args.steps)
    hwm = out.with_suffix(".vmhwm.json")
    cmd = [sys.executable, "-c", FTL_MAIN, "train", str(recipe)]
    for o in [*overrides, f"output.dir={out}"]:
        cmd += ["-o", o]
    proc = _run(cmd, dict(env, BENCH_VMHWM_FILE=str(hwm)))
    s = json.loads((out / "summary.json").read_text())
    recs = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    toks, exs = plan["step_tokens"], plan["step_examples"]
    if len(recs) != len(toks):
        sys.exit(f"ftl logged {len(recs)} train records for {len(toks)} planned steps")
    # per step (log_every 1): tokens_per_s = tokens / dt and samples_per_s = examples / dt
    secs = [n / r["tokens_per_s"] for n, r in zip(toks, recs, strict=True)]
    secs_from_examples = [n / r["samples_per_s"] for n, r in zip(exs, recs, strict=True)]
    mismatch = max(abs(a / b - 1) for a, b in zip(secs, secs_from_examples, strict=True))
    checks = {
        "tokens_seen_match": s["tokens_seen"] == sum(toks),
        "samples_seen_match": s["samples_seen"] == sum(exs),
        "step_seconds_mismatch": round(mismatch, 6),
    }
    if not (checks["tokens_seen_match"] and checks["samples_seen_match"]) or mismatch > 1e-3:
        print(f"warning: ftl's counts differ from the rebuilt micro-batches: {checks}")
    data = s.get("data") or {}
    return {
        "steps": s["steps"],
        "losses": [r["loss"] for r in recs],
        "final_train_loss": s["final_train_loss"],
        "train_time_s": s["train_time_s"],
        "tokens_seen": s["tokens_seen"],
        "samples_seen": s["samples_seen"],
        "tokens_per_s_loop": s["tokens_per_s"],
        "tokens_per_s": round(_steady(toks, secs, args.skip), 1),
        "examples_per_s": round(_steady(exs, secs, args.skip), 2),
        "step_tokens": toks,
        "step_examples": exs,
        "step_loss_tokens": plan["step_loss_tokens"],
        "step_padded_tokens": plan["step_padded_tokens"],
        "step_s": [round(x, 3) for x in secs],
        "packing_efficiency": data.get("packing_efficiency"),
        "data": data,
        "mean_example_tokens": plan["mean_example_tokens"],
        "checks": checks,
        "parameters": s["parameters"],
        "trainable_parameters": s["trainable_parameters"],
        "peak_rss_mb": round(json.loads(hwm.read_text())["vmhwm_mb"], 1),
        "ftl_peak_rss_mb_ru_maxrss": s["peak_rss_mb"],
        "rss_phases_mb": s.get("memory_per_rank"),
        **proc,
    }


def run_trl(packed: bool, out: Path, args, env: dict[str, str]) -> dict:
    cmd = [
        sys.executable, "bench/trl_sft.py", str(out),
        "--model", str(MODEL_DIR), "--train", str(DATA_DIR / "train.jsonl"),
        "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
        "--max-length", str(args.max_length), "--lr", str(args.lr), "--seed", "42",
    ]  # fmt: skip
    if packed:
        cmd.append("--packing")
    proc = _run(cmd, env)
    p = json.loads(out.read_text())
    ends = p["step_end_s"]
    secs = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    return {
        "steps": p["steps"],
        "losses": p["losses"],
        "final_train_loss": p["final_train_loss"],
        "train_time_s": p["train_time_s"],
        "tokens_seen": p["tokens_seen"],
        "samples_seen": p["samples_seen"],
        "tokens_per_s_loop": p["tokens_per_s"],
        "tokens_per_s": round(_steady(p["step_tokens"], secs, args.skip), 1),
        "examples_per_s": round(_steady(p["step_examples"], secs, args.skip), 2),
        "step_tokens": p["step_tokens"],
        "step_examples": p["step_examples"],
        "step_loss_tokens": p["step_loss_tokens"],
        "step_padded_tokens": p["step_padded_tokens"],
        "step_s": [round(x, 3) for x in secs],
        "packing_efficiency": p["data"].get("packing_efficiency"),
        "data": p["data"],
        "mean_example_tokens": p["data"]["mean_example_tokens"],
        "settings": p["settings"],
        "parameters": p["parameters"],
        "trainable_parameters": p["trainable_parameters"],
        "peak_rss_mb": p["peak_rss_mb"],
        "rss_phases_mb": p["rss_mb"],
        **proc,
    }


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import version

    names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets"]
    return {n: version(n) for n in names} | {"python": platform.python_version()}


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


RATIOS = [
    ("ftl-packed", "trl-padded"),
    ("ftl-packed", "trl-packed"),
    ("ftl-packed-all", "trl-padded"),
    ("ftl-packed-all", "trl-packed"),
    ("ftl-packed", "ftl-padded"),
    ("trl-packed", "trl-padded"),
]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per side")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sides", default=",".join(SIDES), help="comma list, in running order")
    ap.add_argument("--passes", type=int, default=1, help="passes; the order reverses each")
    ap.add_argument("--reverse", action="store_true", help="the first pass in reverse order")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on every side (default: all)"
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each side, wait up to this many seconds for other processes to go quiet "
        "(under 0.3 cores); 0: do not wait",
    )
    ap.add_argument(
        "--live-memory",
        action="store_true",
        help="glibc returns freed memory on every side (FTL_KEEP_FREED_MEMORY=0, low mmap "
        "and trim thresholds), so peak RSS follows live memory rather than the allocator's "
        "cache; slower, so tokens/s of such a run is not the speed figure",
    )
    ap.add_argument("--out", type=Path, default=CACHE / "packing_vs_trl.json")
    args = ap.parse_args(argv)
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if any(x not in SIDES for x in sides):
        ap.error(f"--sides: choose from {', '.join(SIDES)}")
    if not 0 <= args.skip < args.steps:
        ap.error("--skip must be below --steps")
    prepare()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env = _env(args.live_memory, args.threads)
    passes = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "packing.yaml"
        recipe.write_text(
            RECIPE.format(
                model=MODEL_DIR,
                data=DATA_DIR,
                max_length=args.max_length,
                steps=args.steps,
                micro_batch=args.micro_batch,
                out=Path(tmp) / "unused",
            )
        )
        for k in range(args.passes):
            order = sides[::-1] if (k + args.reverse) % 2 else sides
            runs: dict = {"order": order}
            for side in order:
                before = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                out = Path(tmp) / f"{side}-{k}"
                packed = "packed" in side
                if side.startswith("ftl"):
                    all_tokens = side.endswith("-all")
                    runs[side] = run_ftl(recipe, packed, out, args, env, all_tokens)
                else:
                    runs[side] = run_trl(packed, out.with_suffix(".json"), args, env)
                runs[side]["other_load_before"] = before
                short = {k2: v for k2, v in runs[side].items() if not k2.startswith("step_")}
                print(json.dumps({"pass": k, "side": side, **short}), flush=True)
            runs["ratios"] = {
                f"{a}/{b}": {
                    key: runs[a][field] / runs[b][field]
                    for key, field in (
                        ("tokens_per_s", "tokens_per_s"),
                        ("tokens_per_s_loop", "tokens_per_s_loop"),
                        ("peak_rss", "peak_rss_mb"),
                    )
                }
                for a, b in RATIOS
                if a in runs and b in runs
            }
            passes.append(runs)
    result = {
        "started": started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "ftl_overrides": {
            "packed": ftl_overrides(True, args.lr),
            "padded": ftl_overrides(False, args.lr),
            "packed-all": ftl_overrides(True, args.lr, all_tokens=True),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "passes": passes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result, args)
    return 0


def _print(result: dict, args) -> None:
    print(
        f"\ntokens/s and examples/s over steps {args.skip + 1}-{args.steps} (non-padding "
        "tokens); peak RSS = VmHWM of each process\n"
    )
    print(
        "| pass | side | tokens/s | examples/s | tokens / step | non-pad share | loss tokens / step "
        "| peak RSS MB | packing efficiency | final train loss | wall s | other load |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for k, runs in enumerate(result["passes"]):
        for side in runs["order"]:
            x = runs[side]
            n = len(x["step_tokens"])
            real, padded = sum(x["step_tokens"]), sum(x["step_padded_tokens"])
            eff = x["packing_efficiency"]
            print(
                f"| {k + 1} | {side} | {x['tokens_per_s']:.0f} | {x['examples_per_s']:.2f} "
                f"| {real / n:.0f} | {real / padded:.1%} | {sum(x['step_loss_tokens']) / n:.0f} "
                f"| {x['peak_rss_mb']:.0f} | {'-' if eff is None else f'{eff:.1%}'} "
                f"| {x['final_train_loss']:.4f} | {x['wall_s']} | {x['other_load']} |"
            )
    print("\n| ratio | tokens/s | tokens/s (whole loop) | peak RSS |\n|---|---|---|---|")
    names = [f"{a}/{b}" for a, b in RATIOS]
    for name in names:
        rs = [p["ratios"][name] for p in result["passes"] if name in p["ratios"]]
        if not rs:
            continue
        cells = []
        for key in ("tokens_per_s", "tokens_per_s_loop", "peak_rss"):
            vals = [r[key] for r in rs]
            cell = f"{vals[0]:.2f}" if len(vals) == 1 else (
                f"{_gmean(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"
            )  # fmt: skip
            cells.append(cell)
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
