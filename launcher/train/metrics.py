"""Eval metrics of the tasks, on gathered predictions (CPU tensors, one list per batch).

Each function takes predictions and labels as the eval loop gathered them and returns
plain floats. Entity scores follow seqeval's default (conlleval) chunking, so the numbers
match what NER papers and `seqeval.metrics.f1_score` report; translation scores are
sacreBLEU's corpus BLEU and chrF.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def class_scores(p: Any, y: Any) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes that occur in labels or predictions."""
    import torch

    accuracy = (p == y).float().mean().item()
    f1s = []
    for c in torch.unique(torch.cat([p, y])):
        tp = ((p == c) & (y == c)).sum().item()
        fp = ((p == c) & (y != c)).sum().item()
        fn = ((p != c) & (y == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def multi_label_scores(p: Any, y: Any) -> dict[str, float]:
    """p, y: (N, C) 0/1. Micro and macro F1 over labels, and exact-match accuracy."""
    p, y = p.bool(), y.bool()
    tp = (p & y).sum(0).double()
    fp = (p & ~y).sum(0).double()
    fn = (~p & y).sum(0).double()
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    per_label = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return {
        "micro_f1": micro.item(),
        "macro_f1": per_label.mean().item(),
        "subset_accuracy": (p == y).all(1).double().mean().item(),
    }


def _ranks(x: Any) -> Any:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    import torch

    order = torch.argsort(x)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for v in torch.unique(x):
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: Any, b: Any) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return (a @ b).item() / denom if denom > 0 else 0.0


def regression_scores(p: Any, y: Any) -> dict[str, float]:
    p, y = p.double().flatten(), y.double().flatten()
    err = p - y
    return {
        "mse": (err**2).mean().item(),
        "rmse": (err**2).mean().sqrt().item(),
        "mae": err.abs().mean().item(),
        "pearson": _pearson(p, y),
        "spearman": _pearson(_ranks(p), _ranks(y)),
    }


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'); a bare type 'PER' counts as inside."""
    if tag == "O":
        return "O", "_"
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I", "E", "S"):
        return prefix, kind or "_"
    return "I", tag


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first, last) chunks of a tag sequence, by conlleval's rules (IOB1/IOB2/IOBES)."""
    found = set()
    prev_tag, prev_type, begin = "O", "_", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, kind = _split_tag(chunk)
        ends = (
            prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag != "O" and prev_type != kind)
        )
        if ends:
            found.add((prev_type, begin, i - 1))
        starts = (
            tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag != "O" and prev_type != kind)
        )
        if starts:
            begin = i
        prev_tag, prev_type = tag, kind
    return found


def entity_scores(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over sentences, and token accuracy."""
    tp = n_pred = n_true = 0
    right = total = 0
    for t, p in zip(true, pred, strict=True):
        te, pe = entities(t), entities(p)
        tp += len(te & pe)
        n_pred += len(pe)
        n_true += len(te)
        right += sum(a == b for a, b in zip(t, p, strict=True))
        total += len(t)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "entity_f1": f1,
        "entity_precision": precision,
        "entity_recall": recall,
        "token_accuracy": right / total if total else 0.0,
    }


def tag_sequences(
    preds: list[Any], labels: list[Any], names: list[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per sentence, the tags at the labelled positions (first sub-token of each word)."""
    true, pred = [], []
    for p_batch, y_batch in zip(preds, labels, strict=True):
        for p_row, y_row in zip(p_batch.tolist(), y_batch.tolist(), strict=True):
            keep = [(names[y], names[p]) for p, y in zip(p_row, y_row, strict=True) if y != IGNORE]
            true.append([y for y, _ in keep])
            pred.append([p for _, p in keep])
    return true, pred


def texts(batches: list[Any], tokenizer: Any) -> list[str]:
    """Token id rows (padding as -100) decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [[pad if t == IGNORE else t for t in row] for b in batches for row in b.tolist()]
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def translation_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
    }
