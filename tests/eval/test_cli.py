"""``mmattn eval chair-score`` / ``pope-score``: JSON on stdout, one-line errors with exit status 2, no output
file after a failure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmattn.cli import main

from .conftest import SYNTHETIC_CAPTIONS
from .test_pope import ANSWERS, EXPECTED

CHAIR_KEYS = {"CHAIRs", "CHAIRi", "Recall", "Len", "Precision", "F1", "n"}
POPE_KEYS = {"accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "n"}


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, out, err, fragment):
    assert code == 2 and out == ""
    assert err.startswith("mmattn: error: ") and fragment in err
    assert err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------ chair-score


def test_chair_score_synthetic_vector(capsys, nltk_data, fake_coco, synthetic_captions_file, tmp_path):
    per_caption = tmp_path / "out" / "per_caption.jsonl"
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(synthetic_captions_file), "--annotations", str(fake_coco),
        "--per-caption", str(per_caption),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == CHAIR_KEYS
    expected = {"CHAIRs": 7 / 12, "CHAIRi": 7 / 27, "Recall": 17 / 23, "Len": 136 / 12, "Precision": 17 / 24}
    assert {key: summary[key] for key in expected} == pytest.approx(expected)
    assert summary["n"] == 12
    records = [json.loads(line) for line in per_caption.read_text().splitlines()]
    assert [record["image_id"] for record in records] == list(SYNTHETIC_CAPTIONS)
    assert records[0]["mscoco_hallucinated_words"] == [["dog", "dog"]] and records[0]["variant"] == "opera"


def test_chair_score_original_variant_and_custom_keys(capsys, nltk_data, fake_coco, tmp_path):
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"id": i, "text": c}) + "\n" for i, c in SYNTHETIC_CAPTIONS.items()))
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(captions), "--annotations", str(fake_coco),
        "--variant", "original", "--image-id-key", "id", "--caption-key", "text",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["CHAIRi"] == pytest.approx(7 / 26)


@pytest.mark.parametrize(
    "lines,fragment",
    [
        (['{"image_id": 1, "caption": "A dog."}', '{"image_id": 2, "caption": ""}'], "caps.jsonl:2: empty caption"),
        (['{"image_id": 1, "caption": "A dog."}', '{"image_id": 2, "caption": "A'], "caps.jsonl:2: invalid JSON"),
        (['{"image_id": 77, "caption": "A dog."}'], "caps.jsonl:1: image id 77 is not in the ground-truth"),
        ([], "caps.jsonl: no captions"),
    ],
)
def test_chair_score_bad_captions(capsys, nltk_data, fake_coco, tmp_path, lines, fragment):
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(line + "\n" for line in lines))
    per_caption = tmp_path / "per_caption.jsonl"
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(captions), "--annotations", str(fake_coco),
        "--per-caption", str(per_caption),
    )  # fmt: skip
    assert_user_error(code, out, err, fragment)
    assert not per_caption.exists()


def test_chair_score_missing_files(capsys, nltk_data, fake_coco, synthetic_captions_file, tmp_path):
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(tmp_path / "none.jsonl"), "--annotations", str(fake_coco)
    )
    assert_user_error(code, out, err, "none.jsonl: no such file")
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(synthetic_captions_file), "--annotations", str(tmp_path / "x")
    )
    assert_user_error(code, out, err, "annotations not found")


def test_chair_score_without_nltk_data(capsys, synthetic_captions_file, fake_coco, tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setenv("MMATTN_SHARED_DATA", str(tmp_path))
    code, out, err = run(
        capsys, "eval", "chair-score", "--captions", str(synthetic_captions_file), "--annotations", str(fake_coco)
    )
    assert_user_error(code, out, err, "python -m nltk.downloader punkt_tab averaged_perceptron_tagger_eng wordnet")
    assert "NLTK_DATA" in err


# ------------------------------------------------------------------------------------------- pope-score


@pytest.fixture
def vector_files(tmp_path):
    questions = tmp_path / "vectors.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "x.jpg", "text": "Is there a dog in the image?", "label": label}) + "\n"
            for i, (_, label) in enumerate(ANSWERS, start=1)
        )
    )
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n" for i, (a, _) in enumerate(ANSWERS, start=1)))
    return questions, answers


@pytest.mark.parametrize("parser", ["official", "opera", "vcd"])
def test_pope_score_parser_vectors(capsys, vector_files, parser):
    questions, answers = vector_files
    code, out, err = run(capsys, "eval", "pope-score", "--answers", str(answers), "--questions", str(questions), "--parser", parser)
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["vectors"] and set(result["vectors"]) == POPE_KEYS
    metrics = result["vectors"]
    _, counts, accuracy, precision, recall, f1, yes_ratio = EXPECTED[parser]
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == counts
    got = (metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"], metrics["yes_ratio"])
    assert got == pytest.approx((accuracy, precision, recall, f1, yes_ratio), abs=1e-6)


def test_pope_score_default_parser_is_official(capsys, vector_files):
    questions, answers = vector_files
    code, out, _ = run(capsys, "eval", "pope-score", "--answers", str(answers), "--questions", str(questions))
    assert code == 0 and json.loads(out)["vectors"]["tp"] == 6


def test_pope_score_llava_labels(capsys, pope_dir, tmp_path):
    from .test_pope import OFFSETS, write_llava_combined

    combined = write_llava_combined(tmp_path / "llava_pope_test.jsonl", pope_dir, ["popular"])
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps({"question_id": OFFSETS["popular"] + i, "text": "Yes"}) + "\n" for i in range(3000, 0, -1))
    )
    code, out, err = run(
        capsys, "eval", "pope-score", "--answers", str(answers), "--questions", str(combined), "--labels", str(pope_dir)
    )
    assert code == 0, err
    metrics = json.loads(out)["popular"]
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"], metrics["n"]) == (1500, 1500, 0, 0, 3000)
    assert metrics["yes_ratio"] == 1.0 and metrics["accuracy"] == 0.5


def test_pope_score_errors(capsys, pope_dir, vector_files, tmp_path):
    questions, answers = vector_files
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(answers.read_text() + json.dumps({"question_id": 99, "text": "yes"}) + "\n")
    code, out, err = run(capsys, "eval", "pope-score", "--answers", str(unknown), "--questions", str(questions))
    assert_user_error(code, out, err, "answers for unknown question ids (99)")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": \n')
    code, out, err = run(capsys, "eval", "pope-score", "--answers", str(broken), "--questions", str(questions))
    assert_user_error(code, out, err, "broken.jsonl:2: invalid JSON")

    categorised = tmp_path / "categorised.jsonl"
    categorised.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "category": "rare"}) + "\n")
    code, out, err = run(
        capsys, "eval", "pope-score", "--answers", str(answers), "--questions", str(categorised), "--labels", str(pope_dir)
    )
    assert_user_error(code, out, err, "unknown category 'rare'")

    # A LLaVA-style question file carries no labels: scoring it without --labels must say so.
    unanswerable = tmp_path / "unlabelled.jsonl"
    unanswerable.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "category": "random"}) + "\n")
    one_answer = tmp_path / "one.jsonl"
    one_answer.write_text(json.dumps({"question_id": 1, "text": "yes"}) + "\n")
    code, out, err = run(capsys, "eval", "pope-score", "--answers", str(one_answer), "--questions", str(unanswerable))
    assert_user_error(code, out, err, "question has no label")

    code, out, err = run(capsys, "eval", "pope-score", "--answers", str(answers), "--questions", str(tmp_path / "no.json"))
    assert_user_error(code, out, err, "no.json: no such file")


def test_eval_group_help(capsys):
    code, out, _ = run(capsys, "eval")
    assert code == 0 and "chair-score" in out and "pope-score" in out


def test_subprocess_exit_status_and_stderr(vector_files, tmp_path):
    questions, _ = vector_files
    command = [sys.executable, "-c", "import sys, mmattn.cli; sys.exit(mmattn.cli.main())"]
    result = subprocess.run(
        command + ["eval", "pope-score", "--answers", str(tmp_path / "none.jsonl"), "--questions", str(questions)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"mmattn: error: {tmp_path / 'none.jsonl'}: no such file"]
