"""`ftl export MODEL_OR_RUN --format hf|vllm-lora --out DIR` (also `tools/export_model.py`).

- `hf`: a serving bundle any Hugging Face loader takes: sharded safetensors (an adapter
  run is merged into its base on the way, streaming), the tokenizer and chat template it
  was trained with, and a generation config whose eos and pad tokens are the tokenizer's
  (so generation stops where training taught it to).
- `vllm-lora`: the adapter as vLLM's `--lora-modules` loads it; what vLLM cannot serve
  (DoRA, modules_to_save, LoRA biases, ...) is refused with the reason and a way out.
- `gguf`: one `model-<quant>.gguf` (f16 or q8_0) for llama.cpp and friends, llama-family
  models with byte-level BPE tokenizers; an adapter is merged first.

`MODEL_OR_RUN` is a run folder (its `model/`), a model folder or an adapter folder.
Written into a temporary folder and renamed into place; `--dry-run` prints the files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import Problem, UserError
from launcher.tools import merge as merge_tool

FORMATS = ("hf", "vllm-lora", "gguf")
# what vLLM's LoRA loader refuses or silently ignores, with the way out
VLLM_REFUSES = {
    "use_dora": "vLLM serves plain LoRA only, not DoRA: merge it (ftl export --format hf)",
    "modules_to_save": "vLLM does not load modules_to_save (trained full copies of layers): "
    "merge it (ftl export --format hf)",
    "lora_bias": "vLLM's LoRA has no bias terms: merge it (ftl export --format hf)",
    "layer_replication": "vLLM does not replicate layers for LoRA: merge it",
}
VLLM_MAX_RANK = 512


def model_folder(path: Path) -> Path:
    """The folder to export: a run's `model/`, or the folder itself."""
    if (path / "model").is_dir() and not (path / "config.json").is_file():
        path = path / "model"
    if not path.is_dir() or not (
        (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    ):
        raise UserError(
            Problem(
                f"{path} holds neither a model (config.json) nor an adapter (adapter_config.json)",
                key="MODEL_OR_RUN",
                hint="pass a run folder whose training finished (RUN/model), a model folder "
                "or an adapter folder; `ftl convert` turns a checkpoint into one",
            )
        )
    return path


def generation_config(folder: Path) -> dict[str, Any]:
    """The bundle's generation config: the model's, with eos and pad from its tokenizer."""
    from transformers import AutoTokenizer

    config_path = folder / "generation_config.json"
    gen = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tok = AutoTokenizer.from_pretrained(folder)
    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.insert(0, tok.eos_token_id)
    gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.setdefault("bos_token_id", tok.bos_token_id)
    return gen


def export_hf(src: Path, out: Path, *, dtype: str | None, overwrite: bool, dry_run: bool) -> str:
    adapter = (src / "adapter_config.json").is_file()
    if adapter:
        name = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        from launcher.assets import resolve_path

        base = resolve_path(name, base=Path.cwd()) if name else None
        if base is None:
            raise UserError(Problem("the adapter does not name its base", key="MODEL_OR_RUN"))
        qlora = merge_tool.qlora_settings(src)  # a QLoRA adapter: its 4-bit base
        plan = merge_tool.plan(base, src, out, dtype, None, overwrite, qlora)
    else:
        plan = merge_tool.plan(src, None, out, dtype, None, overwrite)
    if dry_run:
        what = f"merge of {src} into {plan.base}" if adapter else f"copy of {src}"
        return f"hf bundle ({what})\n{merge_tool.describe(plan)}"
    merge_tool.merge(plan)
    # the generation config follows the tokenizer the bundle ships
    gen = generation_config(out)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return f"hf bundle -> {out} ({len(plan.shards)} shard(s))"


def check_vllm(config: dict[str, Any]) -> list[Problem]:
    problems = []
    for key, why in VLLM_REFUSES.items():
        if config.get(key) not in (None, False, [], {}):
            problems.append(Problem(f"{key} is set: {why}", key=key))
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_MAX_RANK:
        problems.append(
            Problem(
                f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK})",
                key="r",
                hint="merge it (ftl export --format hf)",
            )
        )
    return problems


def export_vllm_lora(src: Path, out: Path, *, overwrite: bool, dry_run: bool) -> str:
    if not (src / "adapter_config.json").is_file():
        raise UserError(
            Problem(
                f"{src} is a full model, not an adapter",
                key="--format",
                hint="vllm-lora exports LoRA adapters; serve a full model with --format hf",
            )
        )
    config = json.loads((src / "adapter_config.json").read_text())
    problems = check_vllm(config)
    if problems:
        raise UserError(problems, title=f"vLLM cannot serve the adapter in {src}:")
    merge_tool.read_adapter(src)  # the weights are readable and complete
    if out.exists() and not overwrite:
        raise UserError(Problem(f"{out} already exists", key="--out", hint="add --overwrite"))
    rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
    serve = (
        f"vllm serve {config.get('base_model_name_or_path')} --enable-lora "
        f"--lora-modules {out.name}={out} --max-lora-rank {max(8, _pow2(rank))}"
    )
    if dry_run:
        return f"vllm-lora: adapter_config.json, adapter_model.safetensors -> {out}\n  {serve}"
    with atomic.folder(out, what="vLLM adapter", key="--out") as tmp:
        cfg = {k: v for k, v in config.items() if v not in (None, [], {}) or k == "target_modules"}
        cfg["inference_mode"] = True
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.copy2(src / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
        for name in merge_tool.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return f"vllm-lora -> {out}\n  serve with: {serve}"


def export_gguf(src: Path, out: Path, *, quant: str, overwrite: bool, dry_run: bool) -> str:
    from launcher.tools.to_gguf import check_model, tokenizer_fields, write_gguf

    adapter = (src / "adapter_config.json").is_file()
    if out.exists() and not overwrite and not dry_run:
        raise UserError(Problem(f"{out} already exists", key="--out", hint="add --overwrite"))
    if dry_run:  # the plan is built in the system's temporary folder; out is not touched
        tmp = Path(tempfile.mkdtemp(prefix="ftl-gguf-plan-"))
    else:
        parent = out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        model = src
        if adapter and dry_run:  # plan from the base: the merge keeps its tensors' shapes
            from launcher.assets import resolve_path

            name = json.loads((src / "adapter_config.json").read_text())["base_model_name_or_path"]
            model = resolve_path(name, base=Path.cwd())
        elif adapter:  # merge first (streaming), into the temporary folder
            model = tmp / "merged"
            export_hf(src, model, dtype=None, overwrite=False, dry_run=False)
        check_model(model)
        tokenizer_fields(model)  # refuses what the GGUF tokenizer fields cannot hold
        name = f"model-{quant}.gguf"
        if dry_run:
            planned = write_gguf(model, tmp / name, quant, dry_run=True)
            merged = " (the adapter merged first)" if adapter else ""
            return (
                f"gguf -> {out / name}{merged}\n  {name}  "
                f"{planned['bytes'] / 2**20:.1f} MiB of tensor data, {planned['tensors']} "
                f"tensors ({planned['types']})\n  tokenizer.json, tokenizer_config.json, "
                "chat_template.jinja"
            )

        (tmp / "bundle").mkdir()
        report = write_gguf(model, tmp / "bundle" / name, quant)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (model / f).is_file():
                shutil.copy2(model / f, tmp / "bundle" / f)
        atomic.publish(tmp / "bundle", out)  # the old output stays until the new one is in
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"gguf -> {out / name} ({report['tensors']} tensors, {report['bytes'] / 2**20:.1f} MiB)"


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# -- command line (ftl export, tools/export_model.py) ------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, metavar="MODEL_OR_RUN", help="run, model or adapter folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--dtype", choices=sorted(merge_tool.DTYPES), help="hf: output dtype")
    p.add_argument("--quant", choices=["f16", "q8_0"], default="f16", help="gguf: weight type")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print what would be written")


def run(args: argparse.Namespace) -> int:
    src = model_folder(args.source)
    if args.format == "hf":
        text = export_hf(
            src, args.out, dtype=args.dtype, overwrite=args.overwrite, dry_run=args.dry_run
        )
    elif args.dtype:
        raise UserError(Problem("--dtype applies to --format hf", key="--dtype"))
    elif args.format == "gguf":
        text = export_gguf(
            src, args.out, quant=args.quant, overwrite=args.overwrite, dry_run=args.dry_run
        )
    else:
        text = export_vllm_lora(src, args.out, overwrite=args.overwrite, dry_run=args.dry_run)
    print(text if args.dry_run else f"ftl export: {text}")
    return 0
