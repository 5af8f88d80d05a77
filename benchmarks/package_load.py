"""Package load time: `load_package` with every byte verified vs a plain safetensors load.

Builds a ~110M-parameter GPT (12 layers, 768 wide, 32000-token vocabulary, tied embeddings;
about 440 MB of fp32 weights), writes it as two packages in a temp dir: one hashed with BLAKE3
(the default for new packages) and one with SHA-256 (how packages were written before), then
times, in interleaved rounds (median of --repeats):

    st.load_file (lazy mmap)     `safetensors.torch.load_file(path)`: safetensors >= 0.8 maps the
                                 file and returns; no byte is read until the tensors are used
    st.load_file (pread)         `load_file(path, backend="pread")`: every byte read into memory
    st.load_file + model         build the model (no init) + load_file + load_state_dict: what a
                                 usable model costs without packages (every byte copied)
    shipyard, BLAKE3             `load_package` of the BLAKE3 package (every byte verified)
    shipyard, SHA-256            `load_package` of the SHA-256 package (every byte verified)
    BLAKE3 of the file           one BLAKE3 pass over the weights (all cores, memory-mapped)
    SHA-256 of the file          one SHA-256 pass over the weights (one stream)

--sweep adds the variants of the BLAKE3 load: hash threads, read-piece sizes, the read alone
(no hash), and "mmap + BLAKE3" (lazy mmap tensors and a BLAKE3 pass over the same mapped file,
so the page cache is read once; not shipyard's default, because later changes to the file would
reach the model).

--cold evicts the package files from the page cache before every timed call
(posix_fadvise(DONTNEED) on just those files; no root needed, other processes' caches are left
alone) and reports how much of the weights file was still cached afterwards.

The claim: shipyard (BLAKE3, every byte verified) ≤ 1.5 × a plain safetensors load.

    python benchmarks/package_load.py                    # warm page cache, ~2 minutes on 2 cores
    python benchmarks/package_load.py --cold --repeats 5
    python benchmarks/package_load.py --sweep --n-layer 6
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import safetensors
import torch
from safetensors.torch import load_file

from shipyard.compress.measure import describe_machine, machine
from shipyard.config import load_config
from shipyard.data import DataInfo
from shipyard.models import build_model, count_parameters
from shipyard.package import load_package, verify_package, write_package
from shipyard.package.loading import build_empty_model
from shipyard.package.manifest import digest_file, sha256_file
from shipyard.package.weights_reader import read_verified_weights


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only; ours are fsynced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int | None:
    """How many bytes of `path` are in the page cache (util-linux `fincore`), if it can tell."""
    exe = shutil.which("fincore")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="evict the files before every call")
    parser.add_argument("--sweep", action="store_true", help="add the BLAKE3 load's variants")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the packages")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "package_load.json"
    )
    args = parser.parse_args()
    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)

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
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        common: dict[str, Any] = {
            "model": model,
            "config": config,
            "data_info": info,
            "preprocessor": None,
            "tokenizer": None,
            "metrics": {},
        }
        pkg_b3 = write_package(Path(tmp) / "blake3", **common)
        pkg_sha = write_package(Path(tmp) / "sha256", hash_algorithm="sha256", **common)
        del model, common
        weights = pkg_b3 / "model.safetensors"
        entry = verify_package(pkg_b3).files["model.safetensors"]
        files = [p for pkg in (pkg_b3, pkg_sha) for p in pkg.iterdir()]

        def model_targets() -> dict[str, torch.Tensor]:
            m = build_empty_model(config.model, info)
            return m.state_dict(keep_vars=True)

        def st_lazy() -> None:
            load_file(weights)

        def st_pread() -> None:
            load_file(weights, backend="pread")

        def st_model() -> None:
            m = build_empty_model(config.model, info)
            m.load_state_dict(load_file(weights), strict=False)

        cases: dict[str, Callable[[], None]] = {
            "st.load_file (lazy mmap)": st_lazy,
            "st.load_file (pread)": st_pread,
            "st.load_file + model": st_model,
            "shipyard, BLAKE3": lambda: load_package(pkg_b3),
            "shipyard, SHA-256": lambda: load_package(pkg_sha),
            "BLAKE3 of the file": lambda: digest_file(weights, "blake3"),
            "SHA-256 of the file": lambda: sha256_file(weights),
        }
        if "backend" not in load_file.__code__.co_varnames:  # safetensors < 0.8: always eager
            del cases["st.load_file (pread)"]
        if args.sweep:

            def read_once(threads: int | None, piece: int) -> Callable[[], None]:
                return lambda: read_verified_weights(
                    weights, entry, model_targets(), piece=piece, threads=threads
                )

            def read_only() -> None:
                unique = {id(t): t for t in model_targets().values()}  # tied weights once
                with weights.open("rb", buffering=0) as fh:
                    for t in unique.values():
                        fh.readinto(memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))

            def mmap_blake3() -> None:
                tensors = load_file(weights)
                digest = blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(weights)
                assert digest.hexdigest() == entry.digest
                m = build_empty_model(config.model, info)
                m.load_state_dict(tensors, strict=False, assign=True)

            cases |= {
                "read once, 1 hash thread, 16 MiB": read_once(1, 16 << 20),
                "read once, all threads, 4 MiB": read_once(None, 4 << 20),
                "read once, all threads, 16 MiB": read_once(None, 16 << 20),
                "read once, all threads, 64 MiB": read_once(None, 64 << 20),
                "read into the model, no hash": read_only,
                "mmap + BLAKE3 (zero-copy)": mmap_blake3,
            }
        for fn in cases.values():  # warm the page cache, the allocator and lazy imports
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        still_cached: list[int] = []
        for _ in range(args.repeats):
            for name, fn in cases.items():
                if args.cold:
                    evict(files)
                    res = resident_bytes(weights)
                    if res is not None:
                        still_cached.append(res)
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        size = weights.stat().st_size
    load_after = os.getloadavg()

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    baselines = [n for n in ("st.load_file (pread)", "st.load_file + model") if n in medians]
    lazy = medians["st.load_file (lazy mmap)"]
    cache = "cold (files evicted before each call)" if args.cold else "warm"
    print(
        f"torch {torch.__version__}, safetensors {safetensors.__version__}, blake3 "
        f"{blake3.__version__}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(f"GPT {args.n_layer}x{args.n_embd}, vocab {args.vocab}: {params / 1e6:.1f}M parameters,")
    print(f"weights {size / 1e6:.0f} MB; {cache} page cache; median of {args.repeats} rounds")
    if still_cached:
        print(f"after eviction: {max(still_cached) / 1e6:.1f} MB of the weights still cached (max)")
    head = f"{'method':<36}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>7}"
    print(head + "".join(f"{'vs ' + b.split(' ', 1)[1]:>16}" for b in baselines))
    for name, ts in times.items():
        row = f"{name:<36}{medians[name]:>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}"
        row += f"{size / medians[name] / 1e9:>7.2f}"
        row += "".join(f"{medians[name] / medians[b]:>15.2f}x" for b in baselines)
        print(row)
    ratios = {b: medians["shipyard, BLAKE3"] / medians[b] for b in baselines}
    for b, r in ratios.items():
        verdict = "met" if r <= 1.5 else "missed"
        print(f"shipyard (BLAKE3) / {b} = {r:.2f}x (target ≤ 1.5x: {verdict})")
    print(
        f"shipyard (BLAKE3) / st.load_file (lazy mmap) = {medians['shipyard, BLAKE3'] / lazy:.1f}x"
        " (the lazy load reads nothing yet; no verified load can approach it)"
    )
    print(
        "shipyard SHA-256 / BLAKE3 = "
        f"{medians['shipyard, SHA-256'] / medians['shipyard, BLAKE3']:.2f}x"
    )

    result: dict[str, Any] = {
        "benchmark": "package_load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            **host,
            "load_average_before_after": [load_before, load_after],
            "safetensors": safetensors.__version__,
            "blake3": blake3.__version__,
        },
        "command": "python benchmarks/package_load.py "
        + f"--n-layer {args.n_layer} --n-embd {args.n_embd} --vocab {args.vocab} "
        + f"--repeats {args.repeats}"
        + (" --cold" if args.cold else "")
        + (" --sweep" if args.sweep else ""),
        "page_cache": "cold" if args.cold else "warm",
        "cold_eviction": "posix_fadvise(POSIX_FADV_DONTNEED) per file" if args.cold else None,
        "max_weights_bytes_cached_after_eviction": max(still_cached) if still_cached else None,
        "parameters": params,
        "weights_bytes": size,
        "seconds": times,
        "median_s": medians,
        "ratio_blake3_load_vs": ratios,
        "ratio_blake3_load_vs_lazy_mmap": medians["shipyard, BLAKE3"] / lazy,
        "target_ratio": 1.5,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
