#!/usr/bin/env python3
"""Format, tokenize and mask a recipe's data into the content-hashed cache ftl train loads.

Same as `ftl preprocess`: python tools/preprocess_dataset.py RECIPE [-o key=value] [--force]
"""

import sys

from launcher.cli.main import standalone

if __name__ == "__main__":
    sys.exit(standalone("preprocess"))
