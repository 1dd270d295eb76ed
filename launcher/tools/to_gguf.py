"""A Hugging Face llama-family folder -> one GGUF file (f16 or q8_0), streaming.

Written with the `gguf` package's own writer: the header and every tensor's info first,
then the tensors one at a time (read with the plain-file safetensors reader), so memory
stays near one tensor. Q and K projections are permuted from Hugging Face's rotate-half
layout to GGML's interleaved one, as llama.cpp's converter does; transformers' GGUF
loader undoes it on load (the test checks that round trip).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError
from launcher.tools.stream import read_header, read_tensor

ARCHS = {"llama": "llama", "mistral": "llama"}  # HF model_type -> GGUF architecture
QUANTS = ("f16", "q8_0")
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(key: str) -> str | None:
    stem, _, kind = key.rpartition(".")
    if stem in TOP:
        return f"{TOP[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:])
        if inner in LAYER:
            return f"blk.{parts[2]}.{LAYER[inner]}.{kind}"
    return None


def permute(w: Any, n_head: int) -> Any:
    """Rotate-half rows (HF) -> interleaved pairs (GGML), per head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def check_model(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise UserError(
            Problem(
                f"GGUF export supports the llama family ({', '.join(ARCHS)}); this model is "
                f"{kind!r} ({', '.join(config.get('architectures') or [])})",
                key="--format",
                hint="export --format hf and convert it with llama.cpp's convert_hf_to_gguf.py",
            )
        )
    return config


def tokenizer_fields(folder: Path) -> dict[str, Any]:
    """Vocabulary, merges, token types and special ids for a byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    data = (
        json.loads((folder / "tokenizer.json").read_text())
        if (folder / "tokenizer.json").is_file()
        else {}
    )
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            Problem(
                "GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen, ...); "
                f"this one is {model.get('type') or 'not a tokenizer.json'}",
                key="--format",
                hint="export --format hf and convert with llama.cpp's converter",
            )
        )
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    special = set(tok.all_special_ids)
    added = {i for i, t in tok.added_tokens_decoder.items() if not t.special}
    types = [3 if i in special else 4 if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
        "unk": tok.unk_token_id,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
        "add_bos": bool(getattr(tok, "add_bos_token", False)),
    }


def write_gguf(folder: Path, path: Path, quant: str, dry_run: bool = False) -> dict[str, Any]:
    """Write `folder` (a safetensors HF model) as one GGUF file at `path` (dry run: only
    plan it and report tensors, types and bytes)."""
    import gguf
    import numpy as np
    import torch

    from launcher.tools.merge import base_shards

    config = check_model(folder)
    tok = tokenizer_fields(folder)
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    entries = [(p, e) for p in base_shards(folder) for e in read_header(p)]
    names = {e.key: gguf_name(e.key) for _p, e in entries}
    unknown = [k for k, v in names.items() if v is None and not k.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise UserError(
            Problem(f"no GGUF name for tensor {unknown[0]} ({len(unknown)} such)", key="--format")
        )
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer = gguf.GGUFWriter(str(path), ARCHS[config["model_type"]])
    writer.add_name(folder.name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for field, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
        ("unk", writer.add_unk_token_id),
    ):
        if tok[field] is not None:
            add(tok[field])
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    plan = []
    for p, e in entries:
        name = names[e.key]
        if name is None:
            continue
        rows_cols = e.shape
        if len(rows_cols) == 1:
            out_type, numpy_dtype = gguf.GGMLQuantizationType.F32, np.float32
        elif quant == "q8_0" and rows_cols[-1] % 32 == 0:
            out_type, numpy_dtype = q8, np.uint8
        else:
            out_type, numpy_dtype = gguf.GGMLQuantizationType.F16, np.float16
        if out_type == q8:
            shape = (*rows_cols[:-1], rows_cols[-1] // 32 * 34)
            nbytes = int(np.prod(shape))
        else:
            shape = rows_cols
            nbytes = int(np.prod(shape)) * np.dtype(numpy_dtype).itemsize
        plan.append((p, e, name, out_type, shape, numpy_dtype, nbytes))
    if dry_run:
        writer.close()
        path.unlink(missing_ok=True)
        return {
            "tensors": len(plan),
            "quant": quant,
            "bytes": sum(x[-1] for x in plan),
            "types": _count(x[3].name for x in plan),
        }
    for _p, _e, name, out_type, shape, numpy_dtype, nbytes in plan:
        writer.add_tensor_info(name, shape, np.dtype(numpy_dtype), nbytes, raw_dtype=out_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), unit="tensor", desc="gguf", file=sys.stderr, mininterval=1.0)
    for p, e, name, out_type, *_ in plan:
        t = read_tensor(p, e).to(torch.float32)
        if name.endswith("attn_q.weight"):
            t = permute(t, heads)
        elif name.endswith("attn_k.weight"):
            t = permute(t, kv)
        arr = t.numpy()
        if out_type == q8:
            arr = gguf.quants.quantize(arr, q8)
        elif out_type == gguf.GGMLQuantizationType.F16:
            arr = arr.astype(np.float16)
        writer.write_tensor_data(arr)
        bar.update(1)
        del t, arr
    bar.close()
    writer.close()
    return {
        "tensors": len(plan),
        "quant": quant,
        "bytes": path.stat().st_size,
        "types": _count(x[3].name for x in plan),
    }


def _count(names: Any) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())
