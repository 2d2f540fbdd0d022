"""Runs a Python script as `python SCRIPT ARGS...` would, then writes the peak memory its process reached to the JSON
file that $PEAK_MEMORY_JSON names: the peak resident set size and, where the script used CUDA, torch's peaks of
allocated and reserved CUDA memory (bytes).

    PEAK_MEMORY_JSON=peak.json accelerate launch benchmarks/peak_memory.py train/train_text_to_image.py --flags ...

A trainer does not report its own peak, and a peak cannot be read from outside the process that allocated it; the
throughput benchmarks launch every trainer through this, ours and diffusers' example alike, so both pay the same.
"""

import json
import os
import resource
import runpy
import sys
from pathlib import Path


def peak_memory() -> dict[str, int]:
    # Linux reports ru_maxrss in kilobytes.
    peak = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    # Only a script that imported torch can have used CUDA; importing it here would cost the others seconds.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return peak


def main() -> None:
    if len(sys.argv) < 2 or "PEAK_MEMORY_JSON" not in os.environ:
        raise SystemExit("usage: PEAK_MEMORY_JSON=FILE python peak_memory.py SCRIPT [ARGS...]")
    out = Path(os.environ["PEAK_MEMORY_JSON"])
    script = sys.argv[1]
    # What `python SCRIPT` sees: its own arguments, and its folder first on the import path.
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        out.write_text(json.dumps(peak_memory()) + "\n")


if __name__ == "__main__":
    main()
