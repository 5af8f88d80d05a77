"""Import memory: peak RSS of `shipyard import-hf` on a ~440 MB Llama checkpoint vs its weights.

Writes a random Llama-family checkpoint (Hugging Face layout: config.json + safetensors shards +
model.safetensors.index.json, fp32, untied embeddings) to a temp dir, then imports it in a fresh
process and reads that process's resident memory: the baseline after `import shipyard` (Python,
torch, the libraries) and the peak at the end (`ru_maxrss`). The import memory-maps the shards and
assigns the tensors into a meta-device model, so the claim is

    (peak RSS - baseline) / weights size <= 1.3

    python benchmarks/import_hf.py                  # ~1 minute on 2 CPU cores
    python benchmarks/import_hf.py --n-layer 2 --hidden 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CHILD = """
import json, resource, sys, time

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

from shipyard.compress import import_hf

base = rss_mb()
start = time.perf_counter()
import_hf(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"baseline_mb": base, "peak_mb": peak, "seconds": seconds}))
"""


def write_checkpoint(out: Path, args: argparse.Namespace) -> int:
    """A random Llama checkpoint in Hugging Face layout; returns the weights' bytes."""
    import torch

    from shipyard.compress.hf import _save_weights
    from shipyard.models.llama import Llama, LlamaConfig, hf_config_from

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.n_layer,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Llama(config)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    _save_weights(state, out, args.shard_mb << 20)
    (out / "config.json").write_text(json.dumps(hf_config_from(config)), encoding="utf-8")
    return sum(t.numel() * t.element_size() for t in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=200, help="safetensors shard size")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "import_hf.json"
    )
    args = parser.parse_args()
    from shipyard.compress.measure import describe_machine, machine

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hf"
        weights = write_checkpoint(src, args)
        shards = len(list(src.glob("*.safetensors")))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / "pkg")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        child = json.loads(run.stdout.strip().splitlines()[-1])
    weights_mb = weights / 2**20
    used = child["peak_mb"] - child["baseline_mb"]
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": host,
        "command": " ".join(["python", "benchmarks/import_hf.py", *sys.argv[1:]]),
        "weights_mb": round(weights_mb, 1),
        "shards": shards,
        "baseline_rss_mb": round(child["baseline_mb"], 1),
        "peak_rss_mb": round(child["peak_mb"], 1),
        "import_rss_mb": round(used, 1),
        "ratio": round(used / weights_mb, 3),
        "seconds": round(child["seconds"], 2),
    }
    print(f"{'weights (MB)':>24} {result['weights_mb']:>10} ({shards} shards)")
    print(f"{'baseline RSS (MB)':>24} {result['baseline_rss_mb']:>10}")
    print(f"{'peak RSS (MB)':>24} {result['peak_rss_mb']:>10}")
    print(f"{'import RSS / weights':>24} {result['ratio']:>10}   (claim: <= 1.3)")
    print(f"{'import time (s)':>24} {result['seconds']:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
