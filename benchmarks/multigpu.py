"""Data-parallel evaluation on two GPUs: `mmattn eval pope` under `accelerate launch --num_processes 2` against
one process, on a LLaVA-1.5-7B-shaped model (random weights, bf16) and on the shipped offline world model.

For each model: one-process run, two-process run (merged results must equal the one-process results byte for
byte), and for the 7B-shaped model a two-process run killed with SIGKILL mid-way and rerun with the same command
(must resume and give the same results). Wall time is measured around each command (model loading included);
generation time comes from the run's config.json.

    python benchmarks/multigpu.py --work /tmp/multigpu --json benchmarks/results/multigpu_h200x2.json \
        --markdown benchmarks/results/multigpu_h200x2.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmattn.eval.io import write_json_atomic, write_text_atomic  # noqa: E402
from mmattn.eval.world import val_image_dir, val_pope_path  # noqa: E402


def build_7b_checkpoint(path: Path) -> None:
    """A LLaVA-1.5-7B-shaped checkpoint with random weights and a word-level processor (336 px, 576 image tokens)."""
    if (path / "config.json").exists():
        return
    from mmattn.testing import llava_7b, save_word_level_llava

    model = llava_7b(device="cuda")
    save_word_level_llava(path, model)
    del model
    torch.cuda.empty_cache()


def pope_command(out: Path, batch: int, *extra: str) -> list[str]:
    return ["eval", "pope", "--out", str(out), "--batch-size", str(batch), *extra]


def launch(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "mmattn.cli", *args, "--device", "cuda:0"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmattn.cli", *args]


def run(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def generation_seconds(out: Path) -> float | None:
    config = json.loads((out / "config.json").read_text())
    return config.get("generation_seconds_this_run")


def same_results(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("samples.jsonl", "summary.json"))


def fresh(out: Path) -> Path:
    """An empty run folder: a leftover one would resume instead of run, and its timings would mean nothing."""
    if out.exists():
        shutil.rmtree(out)
    return out


def kill_and_rerun(args_for, work: Path) -> dict:
    """Start the two-process run, SIGKILL its process group once both ranks have written, rerun it."""
    out = fresh(work / "killed")
    command = launch(args_for(out), 2)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def lines(rank: int) -> int:
        shard = out / f"samples.rank{rank}.jsonl"
        return shard.read_text().count("\n") if shard.exists() else 0

    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and min(lines(0), lines(1)) < 64:
        time.sleep(0.2)
    if process.poll() is not None:
        raise RuntimeError("the run finished before it could be killed; raise --n")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = [lines(0), lines(1)]
    seconds = run(command)
    return {"lines_before_kill": done, "rerun_wall_s": round(seconds, 2), "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (the 7B checkpoint is ~14 GB)")
    parser.add_argument("--n-7b", type=int, default=1200, help="POPE (random split) questions for the 7B-shaped model")
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"this benchmark needs 2 GPUs, found {torch.cuda.device_count()}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "llava-1.5-7b-shaped"
    start = time.perf_counter()
    build_7b_checkpoint(checkpoint)
    print(f"7B-shaped checkpoint ready in {time.perf_counter() - start:.1f} s", flush=True)
    images = str(val_image_dir())
    models = {
        "LLaVA-1.5-7B-shaped (random, bf16)": lambda out: pope_command(
            out, 16, "--model", str(checkpoint), "--questions", str(val_pope_path("random")), "--images", images,
            "--split", "random", "--n", str(args.n_7b)),
        "offline world model (bf16)": lambda out: pope_command(out, 64, "--split", "all", "--n", "2142"),
    }
    rows = []
    for name, args_for in models.items():
        key = "7b" if "7B" in name else "world"
        row = {"model": name}
        for processes in (1, 2):
            out = fresh(work / key / f"p{processes}")
            wall = run(launch(args_for(out), processes))
            row[f"wall_s_{processes}"] = round(wall, 2)
            row[f"generation_s_{processes}"] = generation_seconds(out)
            print(name, processes, "process(es):", row[f"wall_s_{processes}"], "s wall", flush=True)
        row["questions"] = sum(1 for _ in open(work / key / "p1" / "samples.jsonl"))
        row["merged_equals_single"] = same_results(work / key / "p1", work / key / "p2")
        if key == "7b":
            killed = kill_and_rerun(lambda out: args_for(out), work / key)
            row["kill_rerun"] = {"lines_before_kill": killed["lines_before_kill"], "rerun_wall_s": killed["rerun_wall_s"],
                                 "equals_single": same_results(work / key / "p1", killed["out"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    write_json_atomic(args.json, {"meta": {"gpu": f"2x {gpu}", "date": date, "torch": torch.__version__}, "rows": rows})
    lines = [f"`mmattn eval pope` on 2x {gpu}, {date}: one process vs `accelerate launch --num_processes 2`.",
             "", "| model | questions | 1 GPU wall s (gen s) | 2 GPUs wall s (gen s) | speed-up wall (gen) | merged == single | kill + rerun == single |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gen = (f"{r['generation_s_1'] / r['generation_s_2']:.2f}x" if r.get("generation_s_1") and r.get("generation_s_2")
               else "-")
        killed = r.get("kill_rerun")
        killed_text = (f"{killed['equals_single']} (killed after {killed['lines_before_kill']} answers per rank)"
                       if killed else "not run")
        lines.append(f"| {r['model']} | {r['questions']} | {r['wall_s_1']} ({r['generation_s_1']}) | {r['wall_s_2']} "
                     f"({r['generation_s_2']}) | {r['wall_s_1'] / r['wall_s_2']:.2f}x ({gen}) | {r['merged_equals_single']} | "
                     f"{killed_text} |")
    write_text_atomic(args.markdown, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
