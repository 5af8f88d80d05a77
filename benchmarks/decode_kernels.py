"""Decode speed of fp32 vs int8 weights (`--decode-weights`) on a ~250M-parameter Llama-shaped
model with random weights (16 layers, 1024 wide, GQA 16/8, SwiGLU 2816, vocabulary 32,000,
untied head): single stream, greedy, in process, rounds interleaved, medians reported.

    python benchmarks/decode_kernels.py                 # 32 new tokens, 3 rounds, 1 thread
    python benchmarks/decode_kernels.py --tokens 16 --rounds 1
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from shipyard.compress.measure import describe_machine, machine
from shipyard.data.tokenization import Tokenizer
from shipyard.generate import SamplingParams, generate
from shipyard.generate.packed import prepare_decoding
from shipyard.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    vocab_size=32000,
    max_position_embeddings=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {describe_machine(machine())}", flush=True)
    torch.manual_seed(0)
    fp32 = Llama(CONFIG).eval()
    int8 = copy.deepcopy(fp32)
    params_m = sum(p.numel() for p in fp32.parameters()) / 1e6
    print(prepare_decoding(fp32, "fp32"))
    print(prepare_decoding(int8, "int8"))
    tok = Tokenizer.byte()  # ids only: the prompt is given as ids below
    prompt = list(range(40, 60))  # 20 tokens
    params = SamplingParams(max_tokens=args.tokens, temperature=0, stop_on_eos=False)
    warm = SamplingParams(max_tokens=2, temperature=0, stop_on_eos=False)
    generate(fp32, tok, prompt, warm)
    generate(int8, tok, prompt, warm, weights="int8")
    a, b = [], []
    for _ in range(args.rounds):  # interleaved: a shared machine's noise hits both alike
        a.append(generate(fp32, tok, prompt, params))
        b.append(generate(int8, tok, prompt, params, weights="int8"))
    agree = sum(x == y for x, y in zip(a[0].token_ids, b[0].token_ids, strict=True))
    print(f"\nLlama-shaped {params_m:.0f}M params, random weights, prompt 20, N={args.tokens}")
    print("| weights | tokens/s (median) | time to first token, ms (median) |")
    print("| --- | ---: | ---: |")
    for name, runs in (("fp32", a), ("int8", b)):
        tps = statistics.median(r.tokens_per_s for r in runs)
        ttft = statistics.median((r.time_to_first_token_s or 0.0) * 1000 for r in runs)
        print(f"| {name} | {tps:.1f} | {ttft:.0f} |")
    print(f"int8 greedy tokens equal to fp32's: {agree}/{len(a[0].token_ids)} (random weights)")


if __name__ == "__main__":
    main()
