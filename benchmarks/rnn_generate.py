"""rnn language model generation: single-stream `generate` vs the continuous-batching engine.

The model is examples/rnn-charlm.yaml's architecture (2-layer LSTM, n_embd 64, hidden 128, byte
vocabulary) with random weights (speed does not depend on them). Every request produces exactly
N tokens greedily (EOS ignored). Reported, median of the rounds:

1. single stream: tokens/s of one `generate` call;
2. engine, 1 request: the engine's own overhead on the same request;
3. engine, B concurrent requests (different prompts): aggregate tokens/s, the recurrent state
   being the batch's cache; and whether every batched request's tokens equal its `generate`.

    python benchmarks/rnn_generate.py             # N=128, B=16, 3 rounds, 1 thread
    python benchmarks/rnn_generate.py --tokens 32 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from shipyard.compress.measure import describe_machine, machine
from shipyard.data.tokenization import Tokenizer
from shipyard.generate import Engine, SamplingParams, generate
from shipyard.models import RNNConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = RNNConfig(cell="lstm", n_layer=2, n_embd=64, hidden_size=128, head="lm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = machine()
    print(f"machine: {describe_machine(where)}", flush=True)
    torch.manual_seed(0)
    tok = Tokenizer.byte()
    model = build_model(CONFIG, vocab_size=tok.vocab_size).eval()
    params = SamplingParams(max_tokens=args.tokens, temperature=0, stop_on_eos=False)
    prompts = [f"def f{i}(x):\n    return " for i in range(args.batch)]
    generate(model, tok, prompts[0], SamplingParams(max_tokens=4))  # warm-up
    single, engine_one, engine_batch, equal = [], [], [], True
    with Engine(model, tok, max_batch_size=args.batch, max_queue=args.batch) as engine:
        engine.generate(prompts[0], SamplingParams(max_tokens=4))  # warm-up
        for _ in range(args.rounds):  # interleaved: a shared machine's noise hits all alike
            start = time.perf_counter()
            alone = [generate(model, tok, prompts[0], params)]
            single.append(args.tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            engine.generate(prompts[0], params)
            engine_one.append(args.tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            streams = [engine.submit_sync(p, params) for p in prompts]
            results = [s.result() for s in streams]
            engine_batch.append(args.batch * args.tokens / (time.perf_counter() - start))
        alone = [generate(model, tok, p, params) for p in prompts]
        equal = all(r.token_ids == a.token_ids for r, a in zip(results, alone, strict=True))
    rows = {
        "generate, 1 stream": statistics.median(single),
        "engine, 1 request": statistics.median(engine_one),
        f"engine, {args.batch} concurrent": statistics.median(engine_batch),
    }
    print(f"\nrnn LM (LSTM 2x128, random weights), prompt ~22 tokens, N={args.tokens}")
    print("| path | tokens/s (median) |")
    print("| --- | ---: |")
    for name, tps in rows.items():
        print(f"| {name} | {tps:.0f} |")
    print(f"batched tokens equal to each request alone: {equal}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "machine": where,
        "tokens": args.tokens,
        "batch": args.batch,
        "rounds": args.rounds,
        "tokens_per_s": rows,
        "batched_equal_alone": equal,
    }
    (args.out / "rnn_generate.json").write_text(json.dumps(record, indent=2))
    if not equal:
        raise SystemExit("batched tokens differ from single-stream generation")


if __name__ == "__main__":
    main()
