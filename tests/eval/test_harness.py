"""`mmattn eval chair` / `mmattn eval pope` on a tiny checkpoint and a tiny COCO-format dataset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmattn.cli import main
from mmattn.eval.harness import read_finished
from mmattn.testing import save_tiny_llava_checkpoint

CATEGORIES = [(1, "person"), (18, "dog"), (17, "cat"), (47, "cup"), (67, "dining table")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_llava_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    entries, annotations, captions, questions = [], [], [], []
    for i in range(1, 13):
        name = f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / name)
        entries.append({"id": i, "file_name": name, "width": 40, "height": 40})
        present = [CATEGORIES[i % 5], CATEGORIES[(i + 2) % 5]]
        for k, (cid, _) in enumerate(present):
            annotations.append({"id": i * 10 + k, "image_id": i, "category_id": cid, "bbox": [1, 1, 9, 9], "area": 81,
                                "iscrowd": 0})
        captions.append({"id": i, "image_id": i, "caption": f"a {present[0][1]} and a {present[1][1]}"})
        absent = CATEGORIES[(i + 1) % 5][1]
        for label, obj in (("yes", present[0][1]), ("no", absent), ("yes", present[1][1])):
            questions.append({"question_id": len(questions) + 1, "image": name,
                              "text": f"Is there a {obj} in the image?", "label": label})
    cats = [{"id": cid, "name": n, "supercategory": "x"} for cid, n in CATEGORIES]
    (root / "instances_val.json").write_text(json.dumps({"images": entries, "annotations": annotations, "categories": cats}))
    (root / "captions_val.json").write_text(json.dumps({"images": entries, "annotations": captions}))
    (root / "pope_random.json").write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    return root


def pope_args(checkpoint, dataset, out, *extra):
    return ["eval", "pope", "--model", str(checkpoint), "--questions", str(dataset / "pope_random.json"),
            "--images", str(dataset / "images"), "--split", "random", "--out", str(out), "--batch-size", "4",
            "--max-new-tokens", "4", *extra]


def test_pope_run_writes_samples_and_summary(checkpoint, dataset, tmp_path, capsys):
    assert main(pope_args(checkpoint, dataset, tmp_path)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"random"}
    metrics = summary["random"]
    assert metrics["n"] == 36 and metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == 36
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in lines] == list(range(1, 37))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["questions_per_second_this_run"] > 0 and config["batch_size"] == 4
    assert "POPE" in capsys.readouterr().out


def test_batch_size_does_not_change_answers(checkpoint, dataset, tmp_path):
    assert main(pope_args(checkpoint, dataset, tmp_path / "a", "--batch-size", "1")) == 0
    assert main(pope_args(checkpoint, dataset, tmp_path / "b", "--batch-size", "5")) == 0
    a = [json.loads(x)["answer"] for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(x)["answer"] for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert a == b


def test_sigkill_half_way_then_rerun_resumes_exactly(checkpoint, dataset, tmp_path):
    reference = tmp_path / "reference"
    args = pope_args(checkpoint, dataset, reference, "--batch-size", "2", "--max-new-tokens", "24")
    assert main(args) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "mmattn.cli", *pope_args(checkpoint, dataset, killed, "--batch-size", "2",
                                                                "--max-new-tokens", "24")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "samples.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 6:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run must be killed half-way for this test to mean anything"
    done_before = len(read_finished(shard))
    assert 0 < done_before < 36
    assert not (killed / "summary.json").exists()
    with open(shard, "a") as handle:  # a torn last line, as a kill during a write leaves
        handle.write('{"key": "random:99", "ans')
    assert subprocess.run(command, capture_output=True).returncode == 0
    records = [json.loads(x) for x in (killed / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in records) == list(range(1, 37))
    assert (killed / "summary.json").read_text() == (reference / "summary.json").read_text()
    assert records == [json.loads(x) for x in (reference / "samples.jsonl").read_text().splitlines()]


def test_chair_run_scores_captions(checkpoint, dataset, tmp_path, monkeypatch):
    from mmattn.eval.paths import nltk_data_dir

    monkeypatch.setenv("NLTK_DATA", str(nltk_data_dir()))
    args = ["eval", "chair", "--model", str(checkpoint), "--annotations", str(dataset), "--images",
            str(dataset / "images"), "--n", "6", "--max-new-tokens", "6", "--batch-size", "4", "--out", str(tmp_path),
            "--method", "role_bias:image=1.0"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"CHAIRs", "CHAIRi", "Recall", "Len", "Precision", "F1", "n"} <= set(summary) and summary["n"] == 6
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method_specs"] == ["role_bias:image=1.0"] and "RoleBias" in config["methods"][0]
    assert len((tmp_path / "per_caption.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("problem", ["missing image", "corrupt image", "malformed questions", "unknown method",
                                     "unknown model"])
def test_bad_inputs_fail_cleanly(checkpoint, dataset, tmp_path, capsys, problem):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    out = tmp_path / "out"
    args = pope_args(checkpoint, data, out)
    if problem == "missing image":
        (data / "images" / "img_005.png").unlink()
    elif problem == "corrupt image":
        (data / "images" / "img_005.png").write_bytes(b"not a png")
    elif problem == "malformed questions":
        with open(data / "pope_random.json", "a") as handle:
            handle.write("{broken\n")
    elif problem == "unknown method":
        args += ["--method", "nonsense:x=1"]
    else:
        args[args.index("--model") + 1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].split("\r")[-1].startswith("mmattn: error:")
    assert not (out / "summary.json").exists()


def test_two_processes_merge_to_the_single_process_result(checkpoint, dataset, tmp_path):
    single = tmp_path / "single"
    assert main(pope_args(checkpoint, dataset, single)) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "mmattn.cli", *pope_args(checkpoint, dataset, double)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (double / "samples.rank1.jsonl").exists()
    assert (double / "samples.jsonl").read_text() == (single / "samples.jsonl").read_text()
    assert (double / "summary.json").read_text() == (single / "summary.json").read_text()


def test_resuming_into_a_folder_of_another_run_is_refused(checkpoint, dataset, tmp_path, capsys):
    assert main(pope_args(checkpoint, dataset, tmp_path)) == 0
    assert main(pope_args(checkpoint, dataset, tmp_path, "--method", "role_bias:image=1.0")) == 2
    assert "holds a different run (changed: methods)" in capsys.readouterr().err
    assert main(pope_args(checkpoint, dataset, tmp_path)) == 0  # the same command resumes (nothing left to do)


def test_deterministic_flag_is_part_of_the_run(checkpoint, dataset, tmp_path):
    import json

    import torch

    try:
        assert main(pope_args(checkpoint, dataset, tmp_path / "det", "--deterministic")) == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert json.loads((tmp_path / "det" / "run.json").read_text())["deterministic"] is True
    assert main(pope_args(checkpoint, dataset, tmp_path / "plain")) == 0
    assert (tmp_path / "det" / "samples.jsonl").read_text() == (tmp_path / "plain" / "samples.jsonl").read_text()
    assert main(pope_args(checkpoint, dataset, tmp_path / "det")) == 2  # resuming without the flag is refused


def test_run_from_before_the_deterministic_flag_still_resumes(checkpoint, dataset, tmp_path, capsys):
    # run.json written before --deterministic existed has no such key: that run was not deterministic, so the same
    # command (no flag) must resume it, and the flag must still be refused as a different run.
    assert main(pope_args(checkpoint, dataset, tmp_path)) == 0
    fingerprint = json.loads((tmp_path / "run.json").read_text())
    del fingerprint["deterministic"]
    (tmp_path / "run.json").write_text(json.dumps(fingerprint))
    assert main(pope_args(checkpoint, dataset, tmp_path)) == 0
    import torch

    try:
        assert main(pope_args(checkpoint, dataset, tmp_path, "--deterministic")) == 2
    finally:  # the flag switches process-wide settings before the run is checked
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert "changed: deterministic" in capsys.readouterr().err
