"""Host-side (Python + dispatch) cost of mmattn's patching, measured on the CPU with a 32-layer LLaVA-NeXT of toy
widths: with hidden size 32 the tensor work is negligible, so the time is mostly per-layer Python and op dispatch —
the part that makes batch-1 GPU decoding launch-bound. Compares plain sdpa, mmattn with no method (the exact
PyTorch kernel path on the CPU, so this row also includes that path's extra ops) and TransPrune-High.

    python benchmarks/host_overhead.py --json benchmarks/results/host_overhead_cpu.json \\
        --markdown benchmarks/results/host_overhead_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import mmattn
from mmattn.testing import llava_next_inputs, select_sample, tiny_llava_next


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--decode-tokens", type=int, default=8)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_llava_next(layers=32, seed=0)
    inputs = select_sample(llava_next_inputs(model), 1)

    def generate(tokens: int):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    rows = []
    for variant, methods in (("sdpa", None), ("mmattn, no method", []), ("TransPrune-High", [mmattn.TransPrune()])):
        handle = None if methods is None else mmattn.patch(model, *methods)
        try:
            prefill = median_ms(lambda: generate(1), args.repeats)
            full = median_ms(lambda: generate(1 + args.decode_tokens), args.repeats)
        finally:
            if handle is not None:
                handle.remove()
        rows.append({"variant": variant, "prefill_ms": round(prefill, 2),
                     "decode_ms_per_token": round((full - prefill) / args.decode_tokens, 2)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "prompt_tokens": int(inputs["input_ids"].shape[1]), "layers": 32}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Host cost on the CPU ({meta['machine']}, 1 thread, {meta['date']}): 32-layer toy LLaVA-NeXT, "
             f"{meta['prompt_tokens']}-token prompt, median of {args.repeats}.", "",
             "| variant | prefill ms | decode ms/token |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['prefill_ms']} | {r['decode_ms_per_token']} |" for r in rows]
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
