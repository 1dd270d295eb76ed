#!/usr/bin/env python3
"""Split JSONL/CSV/Parquet files or a saved HF dataset into N balanced, shuffled shards.

Same as `ftl shard`: python tools/shard_dataset.py data.jsonl --num-shards 8 --out shards/
"""

import sys

from launcher.cli.main import standalone

if __name__ == "__main__":
    sys.exit(standalone("shard"))
