"""How much a direct pipeline call slows down when the machine's other core is busy: the share of the
end-to-end gap (bench.e2e) that no change to the service can remove on a 2-core machine, where the API,
PostgreSQL, Redis and the encoder must run beside the worker's call.

    python -m bench.contention [--calls 20] [--rounds 3]

Prints the median time of one tiny-model call (8 images, 64x64, 4 steps, one torch thread) alone, beside a
busy Python loop, and beside a memory-bound numpy loop, for each round; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOADS = {
    "alone": None,
    "busy_loop": "while True: pass",
    "memory_loop": "import numpy as np\na = np.ones((4096, 4096), dtype=np.float32)\nwhile True: a *= 1.0000001",
}


def call_ms(pipe: Any, requests: list[dict[str, Any]], calls: int) -> float:
    from worker.generate import generate_batch

    times = []
    for _ in range(calls):
        start = time.perf_counter()
        generate_batch(pipe, requests, lambda step, total: None)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from bench.e2e import load_direct
    from worker.tiny import make_tiny

    options = argparse.Namespace(threads=1)
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        pipe = load_direct(options, make_tiny(Path(tmp) / "tiny-sd"))
    requests = [
        {"prompt": f"bench image {i}", "negative_prompt": None, "width": 64, "height": 64, "steps": 4}
        | {"guidance_scale": 7.0, "seed": i, "num_images": 1}
        for i in range(8)
    ]
    call_ms(pipe, requests, 1)  # warm-up
    results: dict[str, list[float]] = {name: [] for name in LOADS}
    for _ in range(args.rounds):
        for name, code in LOADS.items():
            load = subprocess.Popen([sys.executable, "-c", code]) if code else None
            try:
                time.sleep(0.3 if load else 0)  # the load is running before the first call
                results[name].append(call_ms(pipe, requests, args.calls))
            finally:
                if load:
                    load.kill()
                    load.wait()
            print(f"{name:12} {results[name][-1]:7.1f} ms per call")
    print(json.dumps({f"{name}_ms": round(statistics.median(ms), 1) for name, ms in results.items()}))


if __name__ == "__main__":
    main()
