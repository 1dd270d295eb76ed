#!/usr/bin/env python3
"""Write a serving bundle (hf, vllm-lora) from a run, model or adapter folder.

Same as `ftl export`: python tools/export_model.py runs/my-run --format hf --out bundle/
"""

import sys

from launcher.cli.main import standalone

if __name__ == "__main__":
    sys.exit(standalone("export"))
