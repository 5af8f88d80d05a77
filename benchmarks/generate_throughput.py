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
   The HTTP load comes from a minimal keep-alive client on asyncio streams (`RawClient`), since
   it shares the cores with the server; the 16 streams read through httpx are printed too;
4. shipyard with int8 decoding (`--decode-weights int8`: per-channel int8 weights, the x86 int8
   GEMM where this CPU has one; its KV cache float16 by default): single stream and 16 HTTP
   streams, rounds interleaved with fp32, and how often its greedy tokens equal fp32's (on the
   single prompt, and over all 16 prompts for every engine); the 16 streams also with
   `--kv-cache fp32` (int8 weights, float32 cache, as CTranslate2's int8 keeps it).

5. the decode step: shipyard's single stream with the traced step (the default, see
   `shipyard.generate.traced`) against the eager step ($SHIPYARD_DISABLE_KERNELS=traced-step),
   fp32 and int8, rounds interleaved; CTranslate2 (when installed) single stream and on one
   batch of the 16 prompts.

The summary tables compare shipyard with transformers and with CTranslate2 (fp32 and int8,
converted from the same weights; `pip install shipyard[bench]`) on all three measures; the
peers run one batch in process where shipyard serves 16 HTTP streams.

`--llama` instead runs the Llama-shaped model of about 254M parameters (16 layers, 1024 wide,
GQA 16/8 heads, vocabulary 32,000; random weights): single stream in process (traced and
eager), then the same weights imported as a package (`import_hf`) behind `shipyard serve` for
16 HTTP streams and time to first token, against transformers and CTranslate2 fp32/int8.

    python benchmarks/generate_throughput.py            # N=128 new tokens, 3 repeats
    python benchmarks/generate_throughput.py --quick    # N=32, 1 repeat
    python benchmarks/generate_throughput.py --llama --quick
    python benchmarks/generate_throughput.py --threads 1 --both   # both models, one verdict
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from shipyard.serve.launch import serve_command, start_server

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "gpt", "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}
LLAMA = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
BATCH = 16
STEP_OFF = "traced-step"  # $SHIPYARD_DISABLE_KERNELS value that runs the eager decode step


def with_step(traced: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call fn with the traced decode step on (the default) or off."""
    old = os.environ.get("SHIPYARD_DISABLE_KERNELS")
    if traced:
        os.environ.pop("SHIPYARD_DISABLE_KERNELS", None)
    else:
        os.environ["SHIPYARD_DISABLE_KERNELS"] = STEP_OFF
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            os.environ.pop("SHIPYARD_DISABLE_KERNELS", None)
        else:
            os.environ["SHIPYARD_DISABLE_KERNELS"] = old


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


# ------------------------------------------------------------------------------ CTranslate2


def ct2_generators(hf: Any, work: Path, threads: int) -> dict[str, Any]:
    """CTranslate2 fp32 and int8 generators converted from the same weights ({} if not installed).

    `pip install shipyard[bench]`. The HF model is saved locally and converted with CTranslate2's
    transformers converter; its vocabulary is the token ids spelled "<id>" (no tokenizer files).
    """
    try:
        import ctranslate2
        from ctranslate2.converters.transformers import TransformersConverter
    except ImportError:
        return {}
    n_vocab = hf.config.vocab_size

    class IdVocab:
        bos_token, eos_token, unk_token = "<0>", "<1>", "<0>"

        def get_vocab(self) -> dict[str, int]:
            return {f"<{i}>": i for i in range(n_vocab)}

    class Converter(TransformersConverter):  # type: ignore[misc]
        def load_tokenizer(self, tokenizer_class: Any, path: str, **kwargs: Any) -> Any:
            return IdVocab()

    hf.save_pretrained(work / "ct2-hf")
    generators = {}
    for name, quantization in (("fp32", "float32"), ("int8", "int8")):
        Converter(str(work / "ct2-hf")).convert(
            str(work / f"ct2-{name}"), quantization=quantization, force=True
        )
        generators[name] = ctranslate2.Generator(
            str(work / f"ct2-{name}"), device="cpu", intra_threads=threads, inter_threads=1
        )
    return generators


def agreement_rate(reference: list[list[int]], ids: list[list[int]]) -> float:
    """Share of positions where `ids` has the reference's greedy token (prompt by prompt)."""
    pairs = [(a, b) for r, o in zip(reference, ids, strict=True) for a, b in zip(r, o, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs)


def ct2_generate(generator: Any, batch: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    """Seconds and token ids for CTranslate2 greedy generation of exactly n tokens per prompt."""
    tokens = [[f"<{i}>" for i in p] for p in batch]
    start = time.perf_counter()
    results = generator.generate_batch(
        tokens,
        max_length=n,
        min_length=n,
        include_prompt_in_result=False,
        sampling_topk=1,
        end_token=[],
    )
    return time.perf_counter() - start, [r.sequences_ids[0] for r in results]


# ------------------------------------------------------------------------------ shipyard


def start_shipyard(
    package: Path, threads: int, decode_weights: str = "auto", kv_cache: str = "auto"
) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = serve_command(
        str(package),
        "--torch-threads",
        str(threads),
        "--max-running-seqs",
        str(BATCH),
        "--decode-weights",
        decode_weights,
        "--kv-cache",
        kv_cache,
        "--log-level",
        "warning",
    )
    return start_server(cmd, env=env, cwd=ROOT, capture_stderr=False)


class RawClient:
    """A minimal HTTP/1.1 client on one keep-alive connection (asyncio streams): the load
    generator shares the machine's cores with the server, and httpx's per-chunk work (~4 ms of
    a first token, ~17% of the 16-stream tokens/s here) would be charged to the server."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def stream(self, body: dict[str, Any]) -> tuple[float, float, int]:
        """(time to the first SSE event, total time, completion tokens) of one streamed POST."""
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        start = time.perf_counter()
        self.writer.write(head.encode() + payload)
        status = await self.reader.readuntil(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200"), status
        assert b"transfer-encoding: chunked" in status.lower(), status
        first, body_bytes = None, bytearray()
        while True:  # chunked transfer encoding
            size = int((await self.reader.readline()).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None:
                first = time.perf_counter() - start
            body_bytes += data[:-2]
        elapsed = time.perf_counter() - start
        assert first is not None
        tokens = 0
        for line in body_bytes.decode().splitlines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
        return first, elapsed, tokens

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def completion(prompt: list[int], n: int, *, logprobs: bool = False) -> dict[str, Any]:
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
    return body


async def http_batch(url: str, batch: list[list[int]], n: int) -> tuple[float, int]:
    """Seconds and tokens for len(batch) concurrent streams (all started together, each on its
    own already open connection)."""
    clients = [RawClient(url) for _ in batch]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        start = time.perf_counter()
        results = await asyncio.gather(
            *(c.stream(completion(p, n)) for c, p in zip(clients, batch, strict=True))
        )
        elapsed = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    return elapsed, sum(r[2] for r in results)


async def http_ttft(url: str, prompt: list[int], repeats: int) -> float:
    client = RawClient(url)
    try:
        await client.stream(completion(prompt, 2, logprobs=True))
        times = [
            (await client.stream(completion(prompt, 1, logprobs=True)))[0] for _ in range(repeats)
        ]
    finally:
        client.close()
    return statistics.median(times)


async def httpx_batch(url: str, batch: list[list[int]], n: int) -> float:
    """Tokens/s of the same 16 streams through httpx (the client most users would write)."""
    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(prompt: list[int]) -> int:
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=completion(prompt, n)) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
            return tokens

        await one(batch[0])  # warm the pool
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(p) for p in batch)))
        return tokens / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ decode step


def trace_up_front(model: Any) -> None:
    """Trace the decode and prefill steps now, for the KV cache generation will use (as a
    long-running process would at start-up), and print how long it took."""
    from shipyard.generate.packed import kv_cache_dtype
    from shipyard.generate.traced import traced_prefill, traced_step

    kv_dtype = kv_cache_dtype(model)  # the model was prepared by a first `generate`
    step = traced_step(model, kv_dtype)
    prefill = traced_prefill(model, kv_dtype)
    if step is not None and prefill is not None:
        took = step.trace_s + prefill.trace_s
        print(f"traced decode and prefill steps ({step.kv_dtype} cache) in {took:.2f} s")


def decode_step_rows(
    n: int, traced: list[Any], eager: list[Any], traced8: list[Any], eager8: list[Any]
) -> list[dict[str, Any]]:
    """Single-stream tokens/s of the traced and the eager step, fp32 and int8, and whether
    their greedy tokens agree."""
    rows = []
    for weights, t, e in (("fp32", traced, eager), ("int8", traced8, eager8)):
        tps_t = n / statistics.median(r.total_s for r in t)
        tps_e = n / statistics.median(r.total_s for r in e)
        rows.append(
            {
                "weights": weights,
                "traced_tokens_per_s": tps_t,
                "eager_tokens_per_s": tps_e,
                "speedup": tps_t / tps_e,
                "same_tokens": t[0].token_ids == e[0].token_ids,
            }
        )
    return rows


def print_step_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"decode step, {r['weights']}: traced {r['traced_tokens_per_s']:.1f} tokens/s, eager "
            f"{r['eager_tokens_per_s']:.1f} ({r['speedup']:.2f}x); same greedy tokens: "
            f"{r['same_tokens']}"
        )


def llama_package(model: Any, hf_config: dict[str, Any], work: Path) -> Path:
    """The Llama's weights as a Hugging Face directory (with a word-level tokenizer whose
    tokens are the ids spelled "<id>"), imported as a shipyard package (cached in `work`)."""
    pkg = work / "package"
    if (pkg / "manifest.json").is_file():
        return pkg
    from safetensors.torch import save_file
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    from shipyard.compress import import_hf

    src = work / "hf-dir"
    src.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(hf_config), encoding="utf-8")
    vocab = {f"<{i}>": i for i in range(hf_config["vocab_size"])}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<0>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rust.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<0>", "eos_token": "<1>"}), encoding="utf-8"
    )
    import_hf(src, pkg, name="gen-bench")
    return pkg


def http_rows(
    package: Path, threads: int, batch: list[list[int]], single: list[int], n: int, repeats: int
) -> dict[str, tuple[float, float]]:
    """{weights: (16 HTTP streams tokens/s, time to first token s)} from `shipyard serve`,
    fp32 and int8 servers up at once, rounds interleaved."""
    servers = {w: start_shipyard(package, threads, w) for w in ("fp32", "int8")}
    try:
        for _, url in servers.values():
            asyncio.run(http_batch(url, batch, 4))  # warm-up
        runs: dict[str, list[tuple[float, int]]] = {w: [] for w in servers}
        for _ in range(repeats):
            for w, (_, url) in servers.items():
                runs[w].append(asyncio.run(http_batch(url, batch, n)))
        assert all(t == len(batch) * n for r in runs.values() for _, t in r), runs
        out = {}
        for w, (_, url) in servers.items():
            tps = len(batch) * n / statistics.median(t for t, _ in runs[w])
            out[w] = (tps, asyncio.run(http_ttft(url, single, 5)))
        return out
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)


def llama_main(args: argparse.Namespace, n: int, repeats: int) -> list[dict[str, Any]]:
    """The Llama-shaped model: single stream in process, 16 HTTP streams and time to first
    token from `shipyard serve` (an imported package of the same weights), against
    transformers and CTranslate2."""
    import transformers

    from shipyard.compress.measure import describe_machine, machine
    from shipyard.data.tokenization import Tokenizer
    from shipyard.generate import SamplingParams, generate
    from shipyard.models.llama import Llama, LlamaConfig, hf_config_from

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig.model_validate(LLAMA)
    model = Llama(config).eval()
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    hf_config = transformers.LlamaConfig(**hf_config_from(config))
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    package = llama_package(model, hf_config_from(config), args.work / "llama")
    model8 = copy.deepcopy(model)
    tok = Tokenizer.byte()  # ids only: prompts are token ids, the vocabulary is the model's
    gen = torch.Generator().manual_seed(1)
    batch = [
        torch.randint(3, 32000, (8 + (2 * i) % 31,), generator=gen).tolist() for i in range(BATCH)
    ]
    single = batch[3]
    params = SamplingParams(max_tokens=n, temperature=0, stop_on_eos=False)

    def run(m: Any, weights: str, traced: bool) -> Any:
        return with_step(traced, generate, m, tok, single, params, weights=weights)

    for m, w in ((model, "fp32"), (model8, "int8")):
        run(m, w, False)  # picks the kernels (int8: quantizes)
        trace_up_front(m)
        run(m, w, True)
    ct2 = ct2_generators(hf, args.work / "llama", args.threads)
    for g in ct2.values():
        ct2_generate(g, [single], 2)
    res: dict[tuple[str, bool], list[Any]] = {}
    ct2_s: dict[str, list[tuple[float, list[list[int]]]]] = {k: [] for k in ct2}
    for _ in range(repeats):
        for m, w in ((model, "fp32"), (model8, "int8")):
            for traced in (True, False):
                res.setdefault((w, traced), []).append(run(m, w, traced))
        for name, g in ct2.items():
            ct2_s[name].append(ct2_generate(g, [single], n))
    hf_generate(hf, [single], 2, 0)
    hf_s = [hf_generate(hf, [single], n, 0) for _ in range(repeats)]
    hf_single = n / statistics.median(t for t, _ in hf_s)
    hf_ttft = statistics.median(hf_generate(hf, [single], 1, 0)[0] for _ in range(3))
    hf_batch = BATCH * n / hf_generate(hf, batch, n, 0)[0]  # one round: HF is the slowest here
    ct2_batch = {
        name: BATCH * n / statistics.median(ct2_generate(g, batch, n)[0] for _ in range(repeats))
        for name, g in ct2.items()
    }
    ct2_ttft = {
        name: statistics.median(ct2_generate(g, [single], 1)[0] for _ in range(5))
        for name, g in ct2.items()
    }
    del hf, model, model8  # the servers load their own copies
    served = http_rows(package, args.threads, batch, single, n, repeats)
    step_rows = decode_step_rows(
        n,
        res[("fp32", True)],
        res[("fp32", False)],
        res[("int8", True)],
        res[("int8", False)],
    )
    fp32_ids = res[("fp32", True)][0].token_ids
    same_hf = fp32_ids == hf_s[0][1][0].tolist()
    print(f"\nLlama {LLAMA} ({params_m:.0f}M parameters), prompt {len(single)} tokens, N={n} new")
    print(f"transformers fp32 greedy tokens equal to shipyard fp32's: {same_hf}")
    print_step_rows(step_rows)
    ct2_single = {k: n / statistics.median(t for t, _ in v) for k, v in ct2_s.items()}
    for name in ct2:
        agree = sum(a == b for a, b in zip(ct2_s[name][0][1][0], fp32_ids, strict=True)) / n
        print(f"CTranslate2 {name}: greedy tokens equal to shipyard fp32's: {agree:.0%}")
    single_tps = {r["weights"]: r["traced_tokens_per_s"] for r in step_rows}
    ours = {w: (single_tps[w], served[w][0], served[w][1]) for w in ("fp32", "int8")}
    print()
    hf_rows, ct2_rows = compare(
        ours,
        (hf_single, hf_batch, hf_ttft),
        {k: (ct2_single[k], ct2_batch[k], ct2_ttft[k]) for k in ct2},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "generate_throughput --llama",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": host,
        "transformers": transformers.__version__,
        "model": LLAMA,
        "parameters_m": params_m,
        "new_tokens": n,
        "repeats": repeats,
        "greedy_tokens_identical_hf": same_hf,
        "decode_step": step_rows,
        "vs_hf": hf_rows,
        "vs_ctranslate2": ct2_rows,
    }
    path = args.out / "generate_throughput_llama.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return ct2_rows


# ------------------------------------------------------------------------------ tables


def peer_rows(
    ours: dict[str, tuple[float, float, float]],
    theirs: dict[str, tuple[float, float, float]],
    peer: str,
) -> list[dict[str, Any]]:
    """Rows comparing shipyard's (single stream tokens/s, 16 streams tokens/s, time to first
    token s) per weights kind with a peer's (the peer's fp32 stands in where it has no int8).
    Ratio: shipyard / peer for throughput, peer / shipyard for time to first token."""
    rows = []
    for weights, (single, batch, ttft) in ours.items():
        p_single, p_batch, p_ttft = theirs.get(weights, theirs["fp32"])
        label = weights if weights in theirs else "fp32"
        for measure, a, b, ratio in (
            ("single stream (tokens/s)", single, p_single, single / p_single),
            (f"{BATCH} streams (tokens/s)", batch, p_batch, batch / p_batch),
            ("time to first token (ms)", ttft * 1000, p_ttft * 1000, p_ttft / ttft),
        ):
            rows.append(
                {
                    "measure": f"{weights} {measure}",
                    "shipyard": a,
                    "peer": f"{peer} {label}",
                    "peer_value": b,
                    "ratio": ratio,
                }
            )
    return rows


def compare(
    ours: dict[str, tuple[float, float, float]],
    hf: tuple[float, float, float],
    ct2: dict[str, tuple[float, float, float]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Print shipyard against transformers (ratios) and CTranslate2 (issue 14's >= 1x target,
    when installed); return both tables' rows."""
    hf_rows = peer_rows(ours, {"fp32": hf}, "HF")
    print_rows(hf_rows, "HF", target=None)
    if not ct2:
        print("CTranslate2 not installed (pip install shipyard[bench]): no comparison with it")
        return hf_rows, []
    ct2_rows = peer_rows(ours, ct2, "CTranslate2")
    print()
    print_rows(ct2_rows, "CTranslate2", target=1.0)
    return hf_rows, ct2_rows


def print_rows(rows: list[dict[str, Any]], peer: str, target: float | None) -> None:
    head = f"| {'measure':<34} | {'shipyard':>9} | {peer:>13} | {'ratio':>6} |"
    print(head + (" target |" if target is not None else ""))
    line = f"|{'-' * 36}|{'-' * 10}:|{'-' * 14}:|{'-' * 7}:|"
    print(line + ("--------|" if target is not None else ""))
    for r in rows:
        cells = (
            f"| {r['measure']:<34} | {r['shipyard']:>9.1f} | {r['peer_value']:>13.1f} "
            f"| {r['ratio']:>5.2f}x |"
        )
        if target is not None:
            cells += f" {'met' if r['ratio'] >= target else 'MISSED':<6} |"
        print(cells)
    print(f"(ratio: shipyard / {peer} for tokens/s, {peer} / shipyard for time to first token;")
    print(f" {BATCH} streams: shipyard over HTTP, {peer} one batch in process)")


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=32 tokens, 1 repeat")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-generate")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--llama", action="store_true", help="the ~254M Llama-shaped model instead of the GPT"
    )
    parser.add_argument(
        "--both",
        action="store_true",
        help="the GPT, then the Llama (--llama-tokens new tokens), in one run: one verdict",
    )
    parser.add_argument(
        "--llama-tokens", type=int, default=32, help="with --both: the Llama's new tokens"
    )
    args = parser.parse_args()
    n = args.tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    if args.llama:
        llama_main(args, n, repeats)
        return
    if not args.both:
        gpt_main(args, n, repeats)
        return
    verdict = {"GPT": gpt_main(args, n, repeats)}
    print()
    verdict["Llama"] = llama_main(args, args.llama_tokens, repeats)
    print_verdict(verdict)


def print_verdict(rows_by_model: dict[str, list[dict[str, Any]]]) -> None:
    """One line per model and measure against CTranslate2 (issue 14: >= 1x each), then the
    count, for a run that measured both models."""
    print("\nshipyard vs CTranslate2, both models in this run (>= 1x: met):")
    met = total = 0
    for model, rows in rows_by_model.items():
        for r in rows:
            ok = r["ratio"] >= 1.0
            met, total = met + ok, total + 1
            print(f"  {model:<6} {r['measure']:<34} {r['ratio']:5.2f}x {'met' if ok else 'MISSED'}")
    if not total:
        print("  CTranslate2 not installed: nothing to compare")
        return
    print(f"{met} of {total} measures met")


def gpt_main(args: argparse.Namespace, n: int, repeats: int) -> list[dict[str, Any]]:
    """The GPT 6x384 (the default): every measure of the module docstring; returns the rows
    against CTranslate2 (empty without it)."""
    from shipyard.compress.measure import describe_machine, machine
    from shipyard.generate import SamplingParams, generate
    from shipyard.package import load_package

    host = machine()
    print(f"machine: {describe_machine(host)}", flush=True)

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
    gpt8 = copy.deepcopy(gpt)
    generate(gpt8, tok, single, params, weights="int8")
    ct2 = ct2_generators(hf, args.work, args.threads)
    for g in ct2.values():
        ct2_generate(g, [single], 4)
    trace_up_front(gpt)
    trace_up_front(gpt8)
    ours_s, int8_s, eager_s, eager8_s = [], [], [], []
    with_step(False, generate, gpt, tok, single, params)
    with_step(False, generate, gpt8, tok, single, params, weights="int8")
    ct2_s: dict[str, list[tuple[float, list[list[int]]]]] = {k: [] for k in ct2}
    for _ in range(repeats):  # interleaved rounds: a shared machine's noise hits all alike
        ours_s.append(generate(gpt, tok, single, params))
        int8_s.append(generate(gpt8, tok, single, params, weights="int8"))
        eager_s.append(with_step(False, generate, gpt, tok, single, params))
        eager8_s.append(with_step(False, generate, gpt8, tok, single, params, weights="int8"))
        for name, g in ct2.items():
            ct2_s[name].append(ct2_generate(g, [single], n))
    step_rows = decode_step_rows(n, ours_s, eager_s, int8_s, eager8_s)
    hf_s = [hf_generate(hf, [single], n, tok.pad_id) for _ in range(repeats)]
    same = ours_s[0].token_ids == hf_s[0][1][0].tolist()
    int8_agree = sum(
        a == b for a, b in zip(ours_s[0].token_ids, int8_s[0].token_ids, strict=True)
    ) / len(ours_s[0].token_ids)
    ours_single = n / statistics.median(r.total_s for r in ours_s)
    int8_single = n / statistics.median(r.total_s for r in int8_s)
    hf_single = n / statistics.median(t for t, _ in hf_s)

    # 3. (HF side) time to first token: prefill + one token
    hf_ttft = statistics.median(hf_generate(hf, [single], 1, tok.pad_id)[0] for _ in range(5))
    one = SamplingParams(max_tokens=1, temperature=0, stop_on_eos=False)
    local_ttft = {
        w: statistics.median(generate(m, tok, single, one, weights=w).total_s for _ in range(5))
        for m, w in ((gpt, "fp32"), (gpt8, "int8"))
    }

    # 2. batch of 16: HF padded batch, then shipyard over HTTP
    hf_generate(hf, batch, 4, tok.pad_id)
    hf_b = [hf_generate(hf, batch, n, tok.pad_id)[0] for _ in range(repeats)]
    hf_batch = BATCH * n / statistics.median(hf_b)
    ct2_b = {name: [ct2_generate(g, batch, n) for _ in range(repeats)] for name, g in ct2.items()}
    ct2_batch = {
        name: BATCH * n / statistics.median(t for t, _ in runs_) for name, runs_ in ct2_b.items()
    }
    # greedy agreement with shipyard fp32 over all 16 prompts (a random model's logits are
    # flat: a near tie flips a whole continuation, so one prompt says little)
    reference = [generate(gpt, tok, p, params).token_ids for p in batch]
    batch_ids = {
        "shipyard int8": [generate(gpt8, tok, p, params, weights="int8").token_ids for p in batch],
        "shipyard int8, fp32 KV cache": [
            generate(gpt8, tok, p, params, weights="int8", kv_cache="fp32").token_ids for p in batch
        ],
        **{f"CTranslate2 {name}": runs_[0][1] for name, runs_ in ct2_b.items()},
    }
    agreement = {name: agreement_rate(reference, ids) for name, ids in batch_ids.items()}

    proc, url = start_shipyard(package, args.threads)
    proc8, url8 = start_shipyard(package, args.threads, "int8")
    proc8f, url8f = start_shipyard(package, args.threads, "int8", "fp32")
    try:
        for u in (url, url8, url8f):
            asyncio.run(http_batch(u, batch, 8))  # warm-up
        runs, runs8, runs8f = [], [], []
        for _ in range(repeats):  # interleaved
            runs.append(asyncio.run(http_batch(url, batch, n)))
            runs8.append(asyncio.run(http_batch(url8, batch, n)))
            runs8f.append(asyncio.run(http_batch(url8f, batch, n)))
        every = runs + runs8 + runs8f
        assert all(tokens == BATCH * n for _, tokens in every), every
        ours_batch = BATCH * n / statistics.median(t for t, _ in runs)
        int8_batch = BATCH * n / statistics.median(t for t, _ in runs8)
        int8_fp32kv_batch = BATCH * n / statistics.median(t for t, _ in runs8f)
        ours_ttft = asyncio.run(http_ttft(url, single, 5))
        int8_ttft = asyncio.run(http_ttft(url8, single, 5))
        via_httpx = {
            "fp32": asyncio.run(httpx_batch(url, batch, n)),
            "int8": asyncio.run(httpx_batch(url8, batch, n)),
        }
    finally:
        for p in (proc, proc8, proc8f):
            p.terminate()
            p.wait(timeout=60)

    ct2_single = {k: n / statistics.median(t for t, _ in v) for k, v in ct2_s.items()}
    ct2_ttft = {
        name: statistics.median(ct2_generate(g, [single], 1)[0] for _ in range(5))
        for name, g in ct2.items()
    }
    print(f"\nGPT {MODEL}, byte vocab, prompt {len(single)} tokens (batch: 8-38), N={n} new")
    print(f"greedy tokens identical (single stream): {same}")
    print(f"int8 greedy tokens equal to fp32's: {int8_agree:.0%}")
    for name, runs_ in ct2_s.items():
        ids = runs_[0][1][0]
        agree = sum(a == b for a, b in zip(ids, ours_s[0].token_ids, strict=True)) / n
        print(f"CTranslate2 {name}: greedy tokens equal to shipyard fp32's: {agree:.0%}")
    print(
        f"greedy tokens equal to shipyard fp32's over all {BATCH} prompts: "
        + ", ".join(f"{name} {rate:.1%}" for name, rate in agreement.items())
    )
    print_step_rows(step_rows)
    print(
        f"shipyard {BATCH} HTTP streams read with httpx instead of the raw client: "
        + ", ".join(f"{w} {t:.1f} tokens/s" for w, t in via_httpx.items())
    )
    print(
        "shipyard time to first token in process (prefill + 1, no HTTP): "
        + ", ".join(f"{w} {t * 1000:.1f} ms" for w, t in local_ttft.items())
    )
    print(f"int8 vs fp32 shipyard: single {int8_single / ours_single:.2f}x, ", end="")
    print(f"{BATCH} streams {int8_batch / ours_batch:.2f}x")
    line = f"int8 with a float32 KV cache (--kv-cache fp32): {BATCH} HTTP streams "
    line += f"{int8_fp32kv_batch:.1f} tokens/s"
    if "int8" in ct2_batch:
        line += f" ({int8_fp32kv_batch / ct2_batch['int8']:.2f}x CTranslate2 int8)"
    print(line + "\n")
    ours = {
        "fp32": (ours_single, ours_batch, ours_ttft),
        "int8": (int8_single, int8_batch, int8_ttft),
    }
    rows, ct2_rows = compare(
        ours,
        (hf_single, hf_batch, hf_ttft),
        {k: (ct2_single[k], ct2_batch[k], ct2_ttft[k]) for k in ct2},
    )

    import transformers

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "generate_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": host,
        "transformers": transformers.__version__,
        "model": MODEL,
        "new_tokens": n,
        "repeats": repeats,
        "greedy_tokens_identical": same,
        "int8_greedy_agreement": int8_agree,
        f"greedy_agreement_{BATCH}_prompts": agreement,
        f"int8_fp32_kv_{BATCH}_streams_tokens_per_s": int8_fp32kv_batch,
        "decode_step": step_rows,
        "in_process_ttft_s": local_ttft,
        f"httpx_{BATCH}_streams_tokens_per_s": via_httpx,
        "vs_hf": rows,
        "vs_ctranslate2": ct2_rows,
    }
    path = args.out / "generate_throughput.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return ct2_rows


if __name__ == "__main__":
    main()
