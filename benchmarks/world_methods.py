"""Every LVLM method on the offline world: POPE (three splits) and CHAIR, through the `mmattn eval` commands.

Runs on the CPU in a few minutes per method (the world model is tiny). The world model has 4 decoder layers, so
layer-indexed defaults are scaled to it where a method's defaults address a 32-layer model; the table says which
settings ran. Writes JSON and a markdown table.

    NLTK_DATA=../shared/data/nltk_data python benchmarks/world_methods.py --out runs/world-methods \
        --json benchmarks/results/world_methods.json --markdown benchmarks/results/world_methods.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from mmattn.cli import main as mmattn_main

# On the world model (hidden 192, no massive activations: from layer 2 on, image-token phi has its 99th percentile
# near 1.8 and peaks near 2.1, text tokens reach 2.9), VAR's paper threshold tau = 20 finds no sink and VAR would do
# nothing; tau = 1.8 (about the 99th percentile of image-token phi, so ~1 % of image tokens are sinks) makes it
# act. TransPrune's 7/9/12 schedule needs 13+ layers: the same ratios after layers 1/2/3.
VARIANTS = {
    "baseline": [],
    "VAR (tau=1.8)": ["var:tau=1.8"],
    "GIFT": ["gift"],
    "VHR": ["vhr"],
    "PAINT (cfg 1.1)": ["paint"],
    "TransPrune (after 1/2/3: 87.5/62.5/12.5 %)": ["transprune:accumulation_layers=1/2/3,prune_layers=1/2/3"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the run folders (resumable)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    parser.add_argument("--pope-n", type=int, default=500, help="questions per POPE split")
    parser.add_argument("--chair-n", type=int, default=100)
    parser.add_argument("--only", help="comma-separated variant names")
    args = parser.parse_args()
    rows = []
    for name, methods in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        slug = name.split(" ")[0].lower()
        method_args = [a for spec in methods for a in ("--method", spec)]
        pope_dir = Path(args.out) / f"{slug}-pope"
        chair_dir = Path(args.out) / f"{slug}-chair"
        code = mmattn_main(["eval", "pope", "--out", str(pope_dir), "--n", str(args.pope_n), "--device", "cpu", *method_args])
        code |= mmattn_main(["eval", "chair", "--out", str(chair_dir), "--n", str(args.chair_n), "--device", "cpu",
                             *method_args])
        if code:
            raise SystemExit(f"{name}: mmattn eval failed")
        pope = json.loads((pope_dir / "summary.json").read_text())
        chair = json.loads((chair_dir / "summary.json").read_text())
        rows.append({"variant": name, "methods": methods, "pope": pope, "chair": chair})
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "pope_questions_per_split": args.pope_n, "chair_images": args.chair_n}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Offline world val split, {meta['date']}: POPE {args.pope_n} questions per split (official parser), "
             f"CHAIR on {args.chair_n} images (opera normaliser, 'Please describe this image in detail.'), greedy.", "",
             "| variant | POPE acc random | popular | adversarial | POPE F1 (mean) | CHAIRs | CHAIRi | Recall | Len |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, c = r["pope"], r["chair"]
        f1 = sum(p[s]["f1"] for s in p) / len(p)
        lines.append(f"| {r['variant']} | {p['random']['accuracy']:.3f} | {p['popular']['accuracy']:.3f} | "
                     f"{p['adversarial']['accuracy']:.3f} | {f1:.3f} | {c['CHAIRs']:.3f} | {c['CHAIRi']:.3f} | "
                     f"{c['Recall']:.3f} | {c['Len']:.1f} |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
