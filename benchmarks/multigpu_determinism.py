"""Is two-GPU evaluation bit-identical to one GPU when the kernels are deterministic?

`mmattn eval pope --deterministic` on a LLaVA-1.5-7B-shaped model with random weights (the model of
`benchmarks/multigpu.py`): one process on GPU 0 and one on GPU 1 (at the same time), then
`accelerate launch --num_processes 2`, then a two-process run killed with SIGKILL and rerun; prints how many
answers differ between every pair of runs. Random weights make logits nearly tie, which makes greedy decoding
sensitive to any non-reproducible kernel; that is what makes this a sharp check.

    python benchmarks/multigpu_determinism.py --work /tmp/mgdet [--n 320] [--no-deterministic]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from multigpu import build_7b_checkpoint, fresh, kill_and_rerun, launch, pope_command  # noqa: E402

from mmattn.eval.world import val_image_dir, val_pope_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (the 7B checkpoint is ~14 GB)")
    parser.add_argument("--n", type=int, default=320, help="POPE (random split) questions")
    parser.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "llava-1.5-7b-shaped"
    build_7b_checkpoint(checkpoint)
    extra = ["--deterministic"] if args.deterministic else []

    def pope_args(out: Path) -> list[str]:
        return pope_command(out, 16, "--model", str(checkpoint), "--questions", str(val_pope_path("random")),
                            "--images", str(val_image_dir()), "--split", "random", "--n", str(args.n), *extra)

    def single(name: str, device: str) -> tuple[subprocess.Popen, Path]:
        log = work / f"{name}.log"  # a file, not a pipe: a pipe nobody reads can fill up and stall the run
        command = [sys.executable, "-m", "mmattn.cli", *pope_args(fresh(work / name)), "--device", device]
        with open(log, "w") as handle:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle), log

    start = time.perf_counter()
    runs = [single("gpu0", "cuda:0"), single("gpu1", "cuda:1")]
    for run, log in runs:
        if run.wait() != 0:
            raise SystemExit(log.read_text()[-2000:])
    print(f"one-GPU runs on GPU 0 and GPU 1: {time.perf_counter() - start:.1f} s", flush=True)
    result = subprocess.run(launch(pope_args(fresh(work / "two_gpus")), 2), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    killed = kill_and_rerun(pope_args, work)
    print(f"killed after {killed['lines_before_kill']} answers per rank, rerun took {killed['rerun_wall_s']} s", flush=True)
    answers = {}
    for name in ("gpu0", "gpu1", "two_gpus", "killed"):
        lines = (work / name / "samples.jsonl").read_text().splitlines()
        answers[name] = {json.loads(line)["key"]: json.loads(line)["answer"] for line in lines}
    for a, b in itertools.combinations(answers, 2):
        differ = sum(answers[a][key] != answers[b].get(key) for key in answers[a])
        print(f"{a} vs {b}: {differ} of {len(answers[a])} answers differ", flush=True)


if __name__ == "__main__":
    main()
