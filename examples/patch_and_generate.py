"""Patch a LLaVA model, generate with and without a method, and show what changed.

Runs offline on a tiny config-built LLaVA by default (random weights: the tokens are noise, the mechanics are
real); pass --model PATH for a local checkpoint such as llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import argparse

import torch

import mmattn
from mmattn.testing import llava_inputs, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="role_bias:image=2.0", help="NAME[:key=value,...] (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()

    model = tiny_llava()
    inputs = llava_inputs(model)
    method = mmattn.parse_method_spec(args.method)
    with torch.no_grad():
        baseline = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        with mmattn.patch(model, method) as handle:
            patched = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            layout = handle.context.layout
        restored = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)

    prompt_len = inputs["input_ids"].shape[1]
    print(f"model: tiny LLaVA ({sum(p.numel() for p in model.parameters()):,} parameters), method: {method}")
    for b in range(baseline.shape[0]):
        print(f"sample {b}: {int(layout.valid[b].sum())} prompt tokens, {int(layout.num_image_tokens[b])} image tokens")
        print(f"  baseline: {baseline[b, prompt_len:].tolist()}")
        print(f"  patched : {patched[b, prompt_len:].tolist()}")
    print("restored after removal:", torch.equal(baseline, restored))


if __name__ == "__main__":
    main()
