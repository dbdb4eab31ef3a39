"""Host-side (Python + dispatch) cost of mmattn's patching, measured on the CPU with a 32-layer LLaVA-NeXT of toy
widths: with hidden size 32 the tensor work is negligible, so the time is mostly per-layer Python and op dispatch —
the part that makes batch-1 GPU decoding launch-bound. Compares plain sdpa, mmattn with no method (the exact
PyTorch kernel path on the CPU, so this row also includes that path's extra ops) and TransPrune-High. Each row also
counts the torch calls of one prefill (every call that reaches ``__torch_function__``, attributed to the file that
made it): on a GPU each is roughly one kernel launch's worth of host time, so the counts say where host time goes.

    python benchmarks/host_overhead.py --json benchmarks/results/host_overhead_cpu.json \\
        --markdown benchmarks/results/host_overhead_cpu.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

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


class TorchCallCounter(TorchFunctionMode):
    """Counts torch calls by the source file (outside torch itself) that made them."""

    _torch_dir = os.path.dirname(torch.__file__)
    _metadata = {"size", "dim", "shape", "dtype", "device", "numel", "__get__", "is_cuda", "ndim", "__len__"}

    def __init__(self) -> None:
        super().__init__()
        self.by_file: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in self._metadata:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(self._torch_dir):
                frame = frame.f_back
            name = frame.f_code.co_filename if frame is not None else "?"
            for marker in ("site-packages/", "mmattn/"):
                if marker in name:
                    name = (marker if marker == "mmattn/" else "") + name.split(marker)[-1]
                    break
            self.by_file[name] += 1
        return func(*args, **(kwargs or {}))


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
            with TorchCallCounter() as counter:
                generate(1)
        finally:
            if handle is not None:
                handle.remove()
        rows.append({"variant": variant, "prefill_ms": round(prefill, 2),
                     "decode_ms_per_token": round((full - prefill) / args.decode_tokens, 2),
                     "prefill_torch_calls": sum(counter.by_file.values()),
                     "prefill_torch_calls_by_file": dict(counter.by_file.most_common(8))})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "prompt_tokens": int(inputs["input_ids"].shape[1]), "layers": 32}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Host cost on the CPU ({meta['machine']}, 1 thread, {meta['date']}): 32-layer toy LLaVA-NeXT, "
             f"{meta['prompt_tokens']}-token prompt, median of {args.repeats}.", "",
             "| variant | prefill ms | decode ms/token | torch calls per prefill | most calls from |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['prefill_ms']} | {r['decode_ms_per_token']} | {r['prefill_torch_calls']} | "
              + ", ".join(f"{name} {count}" for name, count in list(r["prefill_torch_calls_by_file"].items())[:3])
              + " |" for r in rows]
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
