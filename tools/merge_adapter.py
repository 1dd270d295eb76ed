#!/usr/bin/env python3
"""Fold a LoRA/DoRA adapter into its base model, streaming shard by shard.

Same as `ftl merge`: python tools/merge_adapter.py --adapter RUN/model --out merged/
"""

import sys

from launcher.cli.main import standalone

if __name__ == "__main__":
    sys.exit(standalone("merge"))
