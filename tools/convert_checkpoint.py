#!/usr/bin/env python3
"""Turn a ZeRO or FSDP training checkpoint into a Hugging Face model folder.

Same as `ftl convert`: python tools/convert_checkpoint.py zero RUN/checkpoints/step-N --out hf/
"""

import sys

from launcher.cli.main import standalone

if __name__ == "__main__":
    sys.exit(standalone("convert"))
