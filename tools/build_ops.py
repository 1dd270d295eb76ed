#!/usr/bin/env python3
"""Compile DeepSpeed's CPU ops once, ahead of the first run that needs them.

    python tools/build_ops.py

DeepSpeed compiles two C++ ops the first time a CPU run needs them: the shared-memory
all-reduce (any ZeRO run on CPU, ~80 s on 2 cores) and cpu_adam (ZeRO-Offload, ~70 s).
This builds both now, in parallel, into torch's extension cache (`TORCH_EXTENSIONS_DIR`,
default ~/.cache/torch_extensions), where every later run and the test suite find them.
The README's setup command runs it. A machine without a C++ compiler skips it: DeepSpeed
then reports the missing compiler when a run needs the op.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

BUILD = """
import sys
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder
{"shm": ShareMemCommBuilder, "adam": CPUAdamBuilder}[sys.argv[1]]().load(verbose=False)
"""


def main() -> int:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        print("build_ops: no C++ compiler; DeepSpeed's CPU ops are left to build on first use")
        return 0
    start = time.time()
    procs = {
        op: subprocess.Popen(
            [sys.executable, "-c", BUILD, op], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for op in ("shm", "adam")
    }
    failed = 0
    for op, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed += 1
            print(f"build_ops: compiling DeepSpeed's {op} op failed:\n{out.decode()[-3000:]}")
    print(f"build_ops: DeepSpeed CPU ops ready ({time.time() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
