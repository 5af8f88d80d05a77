"""Text generation speed: shipyard (`generate`, and the OpenAI routes of `shipyard serve`) vs
Hugging Face `transformers` `GPT2LMHeadModel.generate`, on the same weights.

The model is a 6-layer GPT (n_embd 384, 6 heads, block 256, byte vocabulary), trained for one
step (random weights are fine for speed), packaged, and loaded into both libraries
(`to_hf_gpt2_state_dict`; the parity test in tests/unit/test_models.py proves they compute the
same logits). Every generation produces exactly N tokens (EOS ignored), greedily.

1. single stream: tokens/s of one request (shipyard `generate` vs HF `generate`);
2. batch of 16: aggregate tokens/s of 16 concurrent HTTP streams to a real `shipyard serve`
   (continuous batching) vs HF `generate` on one left-padded batch of the same 16 prompts;
3. time to first token: one HTTP streaming request to shipyard vs HF prefill + first token.

    python benchmarks/generate_throughput.py            # N=128 new tokens, 3 repeats
    python benchmarks/generate_throughput.py --quick    # N=32, 1 repeat
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "gpt", "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}
BATCH = 16


def build_package(work: Path) -> Path:
    """One training step of the benchmark GPT, packaged (cached in `work`)."""
    pkg = work / "gen-bench" / "package"
    if (pkg / "manifest.json").is_file():
        return pkg
    from shipyard.config import load_config
    from shipyard.train import fit, package_run

    config = {
        "name": "gen-bench",
        "seed": 0,
        "task": "language-modeling",
        "data": {
            "source": "builtin:python-stdlib",
            "max_chars": 200_000,
            "tokenizer": {"kind": "byte"},
        },
        "model": MODEL,
        "train": {"epochs": None, "max_steps": 1, "batch_size": 2},
        "eval": {"every_steps": 1000, "max_batches": 1},
    }
    result = fit(load_config(config), run_dir=pkg.parent, progress=False)
    if not (pkg / "manifest.json").is_file():
        package_run(result.run_dir)
    return pkg


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    """n prompts of different lengths (8 to 38 tokens) from a fixed text."""
    text = (
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
        "    return a\n\nprint([fibonacci(i) for i in range(10)])\n"
    )
    ids = tokenizer.encode(text)
    return [ids[i : i + 8 + (2 * i) % 31] for i in range(n)]


# ------------------------------------------------------------------------------ HF


def hf_model(loaded: Any) -> Any:
    import transformers

    from shipyard.models.gpt import hf_gpt2_config_kwargs, to_hf_gpt2_state_dict

    gpt = loaded.model
    config = transformers.GPT2Config(**hf_gpt2_config_kwargs(gpt.config, gpt.vocab_size))
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(to_hf_gpt2_state_dict(gpt), strict=True)
    return hf


def hf_generate(hf: Any, batch: list[list[int]], n: int, pad_id: int) -> tuple[float, Any]:
    """Seconds for HF greedy generation of exactly n tokens for each (left-padded) prompt."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + n, out.shape
    return elapsed, out[:, width:]


# ------------------------------------------------------------------------------ shipyard


def start_server(package: Path, threads: int) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shipyard",
            "serve",
            str(package),
            "--port",
            "0",
            "--torch-threads",
            str(threads),
            "--max-running-seqs",
            str(BATCH),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    match = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    assert match, "server did not print its address"
    url = f"http://127.0.0.1:{match.group(1)}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def stream_one(
    client: httpx.AsyncClient, prompt: list[int], n: int, *, logprobs: bool = False
) -> tuple[float, float, int]:
    """(time to first chunk, total time, completion tokens) of one streamed completion."""
    body: dict[str, Any] = {
        "model": "gen-bench",
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs:
        body["logprobs"] = 0  # every token then makes a chunk, even a held-back byte
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter() - start
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert first is not None
    return first, time.perf_counter() - start, tokens


async def http_batch(url: str, batch: list[list[int]], n: int) -> tuple[float, int]:
    """Seconds and tokens for len(batch) concurrent streams (all started together)."""
    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream_one(client, batch[0], 2)  # warm the connection pool
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, p, n) for p in batch))
        elapsed = time.perf_counter() - start
    return elapsed, sum(r[2] for r in results)


async def http_ttft(url: str, prompt: list[int], repeats: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await stream_one(client, prompt, 2, logprobs=True)
        times = [(await stream_one(client, prompt, 1, logprobs=True))[0] for _ in range(repeats)]
    return statistics.median(times)


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=32 tokens, 1 repeat")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-generate")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    n = args.tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)

    from shipyard.generate import SamplingParams, generate
    from shipyard.package import load_package

    package = build_package(args.work)
    loaded = load_package(package)
    gpt, tok = loaded.model.eval(), loaded.tokenizer
    hf = hf_model(loaded)
    batch = prompts(tok, BATCH)
    single = batch[3]
    params = SamplingParams(max_tokens=n, temperature=0, stop_on_eos=False)

    # 1. single stream, in process
    generate(gpt, tok, single, params)
    hf_generate(hf, [single], 4, tok.pad_id)
    ours_s = [generate(gpt, tok, single, params) for _ in range(repeats)]
    hf_s = [hf_generate(hf, [single], n, tok.pad_id) for _ in range(repeats)]
    same = ours_s[0].token_ids == hf_s[0][1][0].tolist()
    ours_single = n / statistics.median(r.total_s for r in ours_s)
    hf_single = n / statistics.median(t for t, _ in hf_s)

    # 3. (HF side) time to first token: prefill + one token
    hf_ttft = statistics.median(hf_generate(hf, [single], 1, tok.pad_id)[0] for _ in range(5))

    # 2. batch of 16: HF padded batch, then shipyard over HTTP
    hf_generate(hf, batch, 4, tok.pad_id)
    hf_b = [hf_generate(hf, batch, n, tok.pad_id)[0] for _ in range(repeats)]
    hf_batch = BATCH * n / statistics.median(hf_b)

    proc, url = start_server(package, args.threads)
    try:
        asyncio.run(http_batch(url, batch, 8))  # warm-up
        runs = [asyncio.run(http_batch(url, batch, n)) for _ in range(repeats)]
        assert all(tokens == BATCH * n for _, tokens in runs), runs
        ours_batch = BATCH * n / statistics.median(t for t, _ in runs)
        ours_ttft = asyncio.run(http_ttft(url, single, 5))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    rows = [
        ("single stream (tokens/s)", ours_single, hf_single, ours_single / hf_single, 5.0),
        (
            f"{BATCH} streams, aggregate (tokens/s)",
            ours_batch,
            hf_batch,
            ours_batch / hf_batch,
            2.0,
        ),
        ("time to first token (ms)", ours_ttft * 1000, hf_ttft * 1000, hf_ttft / ours_ttft, 1.0),
    ]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nGPT {MODEL}, byte vocab, prompt {len(single)} tokens (batch: 8-38), N={n} new")
    print(
        f"machine: {machine}; torch threads {args.threads}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(f"greedy tokens identical (single stream): {same}\n")
    print(f"| {'measure':<32} | {'shipyard':>9} | {'HF':>9} | {'ratio':>6} | target |")
    print(f"|{'-' * 34}|{'-' * 11}:|{'-' * 11}:|{'-' * 8}:|{'-' * 8}|")
    for name, ours, theirs, ratio, target in rows:
        ok = "met" if ratio >= target else "MISSED"
        print(
            f"| {name:<32} | {ours:>9.1f} | {theirs:>9.1f} | {ratio:>5.2f}x | >={target:g}x {ok} |"
        )
    print("(ratio: shipyard / HF for throughput, HF / shipyard for time to first token)")

    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "generate_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": args.threads,
        "model": MODEL,
        "new_tokens": n,
        "repeats": repeats,
        "greedy_tokens_identical": same,
        "rows": [
            {"measure": name, "shipyard": ours, "hf": theirs, "ratio": ratio, "target": target}
            for name, ours, theirs, ratio, target in rows
        ],
    }
    path = args.out / "generate_throughput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
