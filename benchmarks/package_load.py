"""Package load time: `load_package` (full SHA-256 verification) vs a plain `torch.load`.

Builds a ~124M-parameter GPT (12 layers, 768 wide, 32000-token vocabulary, tied embeddings),
writes it as a package and as a `torch.save(state_dict)` file in a temp dir, then times, with a
warm page cache and interleaved trials (median):

    load_package         verify manifest + every file's SHA-256, rebuild the model, load weights
    torch.load           `torch.load(path, weights_only=True)`: a state dict, not yet a model
    build + torch.load   what a usable model costs without packages: build_model (random init)
                         + torch.load + load_state_dict
    sha256 only          hashing the weights file once (the floor of any verified load)

The claim: load_package ≤ 1.5 × torch.load.

    python benchmarks/package_load.py                   # about a minute on 2 CPU cores
    python benchmarks/package_load.py --repeats 7 --n-layer 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from shipyard.config import load_config
from shipyard.data import DataInfo
from shipyard.models import build_model, count_parameters
from shipyard.package import load_package, write_package
from shipyard.package.manifest import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "package_load.json"
    )
    args = parser.parse_args()

    config = load_config(
        {
            "name": "bench-gpt",
            "task": "language-modeling",
            "data": {"source": "builtin:python-stdlib", "tokenizer": {"kind": "byte"}},
            "model": {
                "name": "gpt",
                "n_layer": args.n_layer,
                "n_head": 12,
                "n_embd": args.n_embd,
                "block_size": 1024,
            },
        }
    )
    info = DataInfo(
        task="language-modeling",
        input_shape=(1024,),
        num_outputs=args.vocab,
        class_names=None,
        feature_names=None,
        vocab_size=args.vocab,
        split_sizes={},
        fingerprint="0" * 64,
    )
    torch.manual_seed(0)
    model = build_model(config.model, vocab_size=args.vocab)
    params = count_parameters(model)

    with tempfile.TemporaryDirectory() as tmp:
        pkg = write_package(
            Path(tmp) / "pkg",
            model=model,
            config=config,
            data_info=info,
            preprocessor=None,
            tokenizer=None,
            metrics={},
        )
        pt = Path(tmp) / "state_dict.pt"
        torch.save(model.state_dict(), pt)
        del model
        weights = pkg / "model.safetensors"

        def package() -> None:
            load_package(pkg)

        def plain() -> None:
            torch.load(pt, weights_only=True)

        def build_and_load() -> None:
            m = build_model(config.model, vocab_size=args.vocab)
            m.load_state_dict(torch.load(pt, weights_only=True))

        def hash_only() -> None:
            sha256_file(weights)

        cases: dict[str, Callable[[], None]] = {
            "load_package": package,
            "torch.load": plain,
            "build + torch.load": build_and_load,
            "sha256 only": hash_only,
        }
        for fn in cases.values():  # warm the page cache and allocator
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        sizes = {"safetensors": weights.stat().st_size, "torch_save": pt.stat().st_size}

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = medians["load_package"] / medians["torch.load"]
    ratio_build = medians["load_package"] / medians["build + torch.load"]
    print(f"GPT {args.n_layer}x{args.n_embd}, vocab {args.vocab}: {params / 1e6:.1f}M parameters,")
    print(f"weights {sizes['safetensors'] / 1e6:.0f} MB; median of {args.repeats} warm-cache runs")
    print(f"{'method':<22}{'median s':>10}{'min s':>10}{'vs torch.load':>15}")
    for name, ts in times.items():
        print(
            f"{name:<22}{medians[name]:>10.3f}{min(ts):>10.3f}"
            f"{medians[name] / medians['torch.load']:>14.2f}x"
        )
    print(f"load_package / torch.load = {ratio:.2f}x (target ≤ 1.5x)")
    print(f"load_package / (build + torch.load) = {ratio_build:.2f}x")

    result: dict[str, Any] = {
        "benchmark": "package_load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": "python benchmarks/package_load.py "
        + f"--n-layer {args.n_layer} --n-embd {args.n_embd} --vocab {args.vocab} "
        + f"--repeats {args.repeats}",
        "parameters": params,
        "bytes": sizes,
        "seconds": times,
        "median_s": medians,
        "ratio_vs_torch_load": ratio,
        "ratio_vs_build_and_torch_load": ratio_build,
        "target_ratio": 1.5,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
