"""shipyard's native decode kernels against PyTorch's on the benchmark GPT's shapes (6 layers,
384 wide, 6 heads), one thread, rounds interleaved, medians reported:

1. int8 linear: the 24 projections of the 6 layers one after another (their weights come from
   L3 or memory, as in the model) at 1-16 rows: shipyard's int8 x int8 kernel (`linear_i8` with
   no hand-off) against fbgemm's dynamic int8 GEMM (`quantized::linear_dynamic`) and the fp32
   weights through `F.linear`;
2. decode attention of 16 rows over ~116 cached slots (row starts 0-30), 6 layers, with 1.8 MB
   of other reads between layers (the weights' share of a step): the native kernel over a
   float32 and a float16 cache against SDPA over the float32 cache.

    python benchmarks/native_kernels.py                 # 30 rounds
    python benchmarks/native_kernels.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shipyard.compress.measure import describe_machine, machine
from shipyard.kernels import native
from shipyard.models.quantized import Int8Linear, _prepack_int8, int8_gemm_available

LAYERS, WIDTH, HEADS, SLOTS, ROWS = 6, 384, 6, 116, 16
SHAPES = [(WIDTH, 3 * WIDTH), (WIDTH, WIDTH), (WIDTH, 4 * WIDTH), (4 * WIDTH, WIDTH)] * LAYERS


def medians(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, the callables interleaved round by round."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def linear_rows(rounds: int) -> None:
    layers = [Int8Linear.from_linear(torch.nn.Linear(k, n)).eval() for k, n in SHAPES]
    packed = [native.pack_int8(layer.weight_int8) for layer in layers]
    gemm = [_prepack_int8(layer) for layer in layers] if int8_gemm_available() else None
    fp32 = [layer.dequantized_weight() for layer in layers]
    print("| rows | shipyard int8 (ms) | fbgemm int8 (ms) | F.linear fp32 (ms) ", end="")
    print("| fbgemm / shipyard |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rows in (1, 4, 8, 12, 16):
        xs = {k: torch.randn(rows, k) for k in (WIDTH, 4 * WIDTH)}

        def ours(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer, p in zip(layers, packed, strict=True):
                x = xs[layer.in_features]
                torch.ops.shipyard.linear_i8(
                    x, p, layer.weight_scale, layer.bias, layer.in_features, None, 1 << 30
                )

        def fbgemm(xs: dict[int, torch.Tensor] = xs) -> None:
            assert gemm is not None
            for layer, g in zip(layers, gemm, strict=True):
                torch.ops.quantized.linear_dynamic(xs[layer.in_features], g, True)

        def reference(xs: dict[int, torch.Tensor] = xs) -> None:
            for layer, w in zip(layers, fp32, strict=True):
                F.linear(xs[layer.in_features], w, layer.bias)

        runs = {"ours": ours, "fp32": reference} | ({"fbgemm": fbgemm} if gemm else {})
        t = medians(runs, rounds)
        fb = t.get("fbgemm", float("nan"))
        print(
            f"| {rows} | {t['ours'] * 1e3:.2f} | {fb * 1e3:.2f} | {t['fp32'] * 1e3:.2f} "
            f"| {fb / t['ours']:.2f}x |"
        )


def attention_rows(rounds: int) -> None:
    hs = WIDTH // HEADS
    capacity = SLOTS + 12
    keys = torch.randn(LAYERS, ROWS, HEADS, capacity, hs)
    values = torch.randn(LAYERS, ROWS, HEADS, capacity, hs)
    keys16, values16 = keys.half(), values.half()
    starts = torch.tensor([(2 * i) % 31 for i in range(ROWS)])
    mask = (torch.arange(SLOTS)[None, :] >= starts[:, None]).view(ROWS, 1, 1, SLOTS)
    q = torch.randn(ROWS, HEADS, 1, hs)
    others = [torch.randn(442_000) for _ in range(LAYERS)]  # 1.8 MB per layer

    def step(attend: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for layer in range(LAYERS):
                others[layer].sum()
                attend(layer)

        return run

    def native_over(k: torch.Tensor, v: torch.Tensor) -> Callable[[int], object]:
        return lambda i: torch.ops.shipyard.decode_attention(
            q, k[i, :, :, :SLOTS], v[i, :, :, :SLOTS], mask, hs**-0.5
        )

    runs = {
        "other reads only": step(lambda i: None),
        "SDPA, float32 cache": step(
            lambda i: F.scaled_dot_product_attention(
                q, keys[i, :, :, :SLOTS], values[i, :, :, :SLOTS], attn_mask=mask
            )
        ),
        "native, float32 cache": step(native_over(keys, values)),
        "native, float16 cache": step(native_over(keys16, values16)),
    }
    t = medians(runs, rounds * 4)
    base = t.pop("other reads only")
    print(f"\n{LAYERS} layers of decode attention, {ROWS} rows x {SLOTS} slots (less other reads)")
    print("| kernel | ms | vs SDPA |")
    print("| --- | ---: | ---: |")
    sdpa = t["SDPA, float32 cache"] - base
    for name, seconds in t.items():
        print(f"| {name} | {(seconds - base) * 1e3:.2f} | {sdpa / (seconds - base):.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {describe_machine(machine())}")
    if not native.load():
        print(f"native kernels unavailable here: {native.native_unavailable()}")
        return
    with torch.inference_mode():
        linear_rows(args.rounds)
        attention_rows(args.rounds)


if __name__ == "__main__":
    main()
