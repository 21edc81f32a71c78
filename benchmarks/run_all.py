"""`make bench`: every benchmark in this folder, one after another, each writing results/<name>.json."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    failed = []
    for script in ("train_throughput.py", "levers.py", "sampling.py", "tokenizer_norm.py", "tokenizer_precision.py",
                   "encode_throughput.py", "distributed_memory.py"):
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]]).returncode:
            failed.append(script)
    sys.exit(f"failed: {', '.join(failed)}" if failed else 0)
