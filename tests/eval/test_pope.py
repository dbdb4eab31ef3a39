"""POPE: parser vectors of specs/evaluators.md §5.5, the official files, labels by LLaVA's convention, builder."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from mmattn.eval import pope
from mmattn.eval.io import EvalInputError

# ---------------------------------------------------------------------------- §5.5 parser vectors

ANSWERS = [
    ("Yes", "yes"),
    ("No", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is no cat in the image.", "no"),
    ("I don't think so", "no"),
    ("Not sure.", "yes"),
    ("NO", "yes"),
    ("Yes. There is no other animal.", "yes"),
    ("no.", "yes"),
    ("There isn't a car.", "no"),
    ("The image does not contain a knife.", "no"),
    ("Unknown", "yes"),
    ("Yes, but not clearly visible.", "yes"),
]

# parser -> (predictions or None, (TP, FP, TN, FN), accuracy, precision, recall, f1, yes_ratio)
EXPECTED = {
    "official": ([1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 0], (6, 2, 4, 2), 0.714286, 0.75, 0.75, 0.75, 0.571429),
    "opera": ([1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0], (4, 0, 6, 4), 0.714286, 1.0, 0.5, 0.666667, 0.285714),
    "vcd": (None, (4, 2, 4, 4), 0.571429, 0.666667, 0.5, 0.571429, 0.428571),
}


@pytest.mark.parametrize("parser", pope.PARSERS)
def test_parser_vectors(parser):
    predictions, counts, accuracy, precision, recall, f1, yes_ratio = EXPECTED[parser]
    predicted = [pope.predict_yes(answer, label, parser) for answer, label in ANSWERS]
    if predictions is not None:
        assert [int(p) for p in predicted] == predictions
    metrics = pope.pope_metrics(zip(predicted, (label == "yes" for _, label in ANSWERS)))
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == counts
    assert metrics["n"] == 14
    got = (metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"], metrics["yes_ratio"])
    assert got == pytest.approx((accuracy, precision, recall, f1, yes_ratio), abs=1e-6)


def test_metrics_guard_zero_division():
    # Nothing predicted yes, and no gold yes: the reference scripts raise ZeroDivisionError here.
    metrics = pope.pope_metrics([(False, False), (False, False)])
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == metrics["yes_ratio"] == 0.0
    assert metrics["accuracy"] == 1.0
    assert pope.pope_metrics([])["n"] == 0 and pope.pope_metrics([])["accuracy"] == 0.0


def test_unknown_parser():
    with pytest.raises(EvalInputError, match="unknown POPE parser"):
        pope.predict_yes("yes", "yes", "llava")


# ----------------------------------------------------------------------------------- official files


@pytest.mark.parametrize("split", pope.SPLITS)
def test_official_files_load(pope_dir, split):
    questions = pope.load_official_split(split, pope_dir)
    assert len(questions) == 3000
    assert len({question.image for question in questions}) == 500
    assert Counter(question.label for question in questions) == {"yes": 1500, "no": 1500}
    assert {question.split for question in questions} == {split}
    assert [question.question_id for question in questions] == list(range(1, 3001))
    # COCO files alternate yes, no within an image.
    assert [question.label for question in questions[:6]] == ["yes", "no"] * 3
    assert all(question.text.startswith("Is there a") and question.text.endswith("?") for question in questions)
    assert pope.question_file_version(pope_dir / f"coco_pope_{split}.json") == (split, "109985c")


def test_official_line_endings_are_as_documented(pope_dir):
    # Popular and adversarial use CRLF, random LF: the loader must accept both (checked above).
    assert b"\r\n" in (pope_dir / "coco_pope_popular.json").read_bytes()[:200]
    assert b"\r\n" in (pope_dir / "coco_pope_adversarial.json").read_bytes()[:200]
    assert b"\r\n" not in (pope_dir / "coco_pope_random.json").read_bytes()[:200]


def test_json_array_and_crlf_give_the_same_questions(pope_dir, tmp_path):
    official = pope.load_official_split("popular", pope_dir)
    array = tmp_path / "gqa_pope_seem_popular.json"
    array.write_text(json.dumps([question.to_record() for question in official], indent=2))
    lf = tmp_path / "lf_popular.json"
    lf.write_bytes((pope_dir / "coco_pope_popular.json").read_bytes().replace(b"\r\n", b"\n"))
    strip = [(q.question_id, q.image, q.text, q.label, q.split) for q in official]
    assert [(q.question_id, q.image, q.text, q.label, q.split) for q in pope.load_questions(array)] == strip
    assert [(q.question_id, q.image, q.text, q.label) for q in pope.load_questions(lf)] == [s[:4] for s in strip]
    # The same content with other line endings is still recognised as the same file version.
    assert pope.question_file_version(lf) == ("popular", "109985c")


def _answers_file(path, answers, key="text"):
    path.write_text("".join(json.dumps({"question_id": qid, key: text}) + "\n" for qid, text in answers))
    return path


def _expected_counts(questions, predicted_yes):
    counts = Counter()
    for question in questions:
        yes = predicted_yes[question.question_id]
        gold = question.label == "yes"
        counts["tp" if yes and gold else "fp" if yes else "fn" if gold else "tn"] += 1
    return counts


def test_score_official_file_by_question_id(pope_dir, tmp_path):
    questions = pope.load_official_split("adversarial", pope_dir)
    rng = random.Random(7)
    predicted_yes = {q.question_id: (q.label == "yes") != (rng.random() < 0.2) for q in questions}
    shuffled = list(predicted_yes.items())
    rng.shuffle(shuffled)  # order must not matter: matching is by question_id
    answers = _answers_file(tmp_path / "a.jsonl", [(qid, "Yes." if yes else "No, there is not.") for qid, yes in shuffled])
    result = pope.evaluate_pope(answers, pope_dir / "coco_pope_adversarial.json")
    assert list(result) == ["adversarial"]
    counts = _expected_counts(questions, predicted_yes)
    metrics = result["adversarial"]
    assert {key: metrics[key] for key in ("tp", "fp", "tn", "fn")} == {key: counts[key] for key in ("tp", "fp", "tn", "fn")}
    assert metrics["n"] == 3000
    assert metrics["accuracy"] == pytest.approx((counts["tp"] + counts["tn"]) / 3000)
    assert metrics["yes_ratio"] == pytest.approx((counts["tp"] + counts["fp"]) / 3000)


# ------------------------------------------------------------------ LLaVA combined file and --labels


SUFFIX = "\nAnswer the question using a single word or phrase."
OFFSETS = {"adversarial": 0, "random": 10000000, "popular": 20000000}


def write_llava_combined(path, pope_dir, splits):
    """A question file in the shape of LLaVA's llava_pope_test.jsonl (category, no label, offset ids)."""
    lines = []
    for split in splits:
        for question in pope.load_official_split(split, pope_dir):
            lines.append(
                {"question_id": OFFSETS[split] + question.question_id, "image": question.image,
                 "text": question.text + SUFFIX, "category": split}
            )  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_llava_labels_convention(pope_dir, tmp_path):
    combined = write_llava_combined(tmp_path / "llava_pope_test.jsonl", pope_dir, ["adversarial", "popular"])
    rng = random.Random(3)
    answers, per_split = [], {}
    for split in ("adversarial", "popular"):
        predicted = {}
        for question in pope.load_official_split(split, pope_dir):
            yes = rng.random() < 0.5
            predicted[question.question_id] = yes
            answers.append((OFFSETS[split] + question.question_id, "Yes" if yes else "No"))
        per_split[split] = predicted
    rng.shuffle(answers)
    answer_file = _answers_file(tmp_path / "answers.jsonl", answers)
    result = pope.evaluate_pope(answer_file, combined, labels_dir=pope_dir)
    assert list(result) == ["popular", "adversarial"]
    for split, predicted in per_split.items():
        counts = _expected_counts(pope.load_official_split(split, pope_dir), predicted)
        assert {key: result[split][key] for key in counts} == dict(counts)
        assert result[split]["n"] == 3000


def test_labels_unknown_category(pope_dir, tmp_path):
    combined = tmp_path / "q.jsonl"
    combined.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "?", "category": "rare"}) + "\n")
    with pytest.raises(EvalInputError, match=r"unknown category 'rare': .*coco_pope_rare.json not found"):
        pope.attach_labels(pope.load_questions(combined), pope_dir)


def test_labels_count_mismatch_names_the_version_problem(pope_dir, tmp_path):
    # LLaVA's file pins the old random split (2,910 questions); the current label file has 3,000.
    questions = pope.load_official_split("random", pope_dir)[:2910]
    combined = tmp_path / "q.jsonl"
    combined.write_text(
        "".join(json.dumps({"question_id": q.question_id, "image": q.image, "text": q.text, "category": "random"}) + "\n" for q in questions)
    )
    with pytest.raises(EvalInputError, match="2910 questions but 3000 labels.*versions"):
        pope.attach_labels(pope.load_questions(combined), pope_dir)


# ------------------------------------------------------------------------------------- bad inputs


def test_answers_for_unknown_ids(pope_dir, tmp_path):
    answers = _answers_file(tmp_path / "a.jsonl", [(q, "yes") for q in range(1, 3001)] + [(5000, "no")])
    with pytest.raises(EvalInputError, match=r"1 answers for unknown question ids \(5000\)"):
        pope.evaluate_pope(answers, pope_dir / "coco_pope_random.json")


def test_partial_split_is_an_error_unless_allowed(pope_dir, tmp_path):
    answers = _answers_file(tmp_path / "a.jsonl", [(1, "yes"), (2, "no")], key="answer")
    with pytest.raises(EvalInputError, match="2998 of 3000 questions have no answer"):
        pope.evaluate_pope(answers, pope_dir / "coco_pope_random.json")
    result = pope.evaluate_pope(answers, pope_dir / "coco_pope_random.json", allow_partial=True)
    assert result["random"]["n"] == 2 and result["random"]["accuracy"] == 1.0


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"question_id": 1, "text": "yes"}\n{"question_id": 2, "text": "no"', r"a.jsonl:2: invalid JSON"),
        ('{"question_id": 1, "text": "yes"}\n\n["not", "an", "object"]\n', r"a.jsonl:3: expected a JSON object"),
        ('{"question_id": 1, "text": "yes"}\n{"question_id": 1, "text": "no"}\n', r"a.jsonl:2: second answer for question_id 1"),
        ('{"question_id": 1}\n', r"a.jsonl:1: no answer"),
        ('{"question_id": 1, "text": 3}\n', r"a.jsonl:1: answer 'text' must be a string"),
        ("", r"a.jsonl: no answers"),
    ],
)
def test_malformed_answers(content, message, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(EvalInputError, match=message):
        pope.load_answers(path)


def test_malformed_questions(tmp_path):
    path = tmp_path / "coco_pope_random.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "?", "label": "yes"}\r\n{"question_id": 2, "image": "a.jpg", "text": "?", "label": "maybe"}\r\n')
    with pytest.raises(EvalInputError, match=r"coco_pope_random.json:2: label must be 'yes' or 'no'"):
        pope.load_questions(path)
    with pytest.raises(EvalInputError, match="no such file"):
        pope.load_questions(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------- builder


def synthetic_instances(path, num_images=60, seed=11):
    names = ["person", "car", "dog", "cat", "chair", "cup", "umbrella", "bus", "apple", "tv", "bed", "kite"]
    rng = random.Random(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"img_{image_id:04d}.jpg"})
        for category in rng.sample(range(len(names)), rng.randint(1, 6)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    return synthetic_instances(tmp_path_factory.mktemp("pope") / "instances_val2014.json")


def records(questions):
    return [question.to_record() for question in questions]


def test_builder_is_deterministic_given_the_seed(instances):
    first = pope.build_all_splits(instances, seed=0, num_images=20)
    again = pope.build_all_splits(instances, seed=0, num_images=20)
    other = pope.build_all_splits(instances, seed=1, num_images=20)
    for split in pope.SPLITS:
        assert records(first[split]) == records(again[split])
    assert records(first["random"]) != records(other["random"])
    # One image sample per seed, shared by the three splits.
    assert len({tuple(dict.fromkeys(q.image for q in first[split])) for split in pope.SPLITS}) == 1


def test_builder_structure_and_negative_strategies(instances):
    images = dict(pope.image_objects_from_coco(instances))
    built = pope.build_all_splits(instances, seed=5, num_images=20)
    chosen = list(dict.fromkeys(q.image for q in built["random"]))
    frequency = Counter(name for image in chosen for name in images[image])
    co_occurrence = {}
    for image in chosen:
        for name in images[image]:
            for other in images[image]:
                if other != name:
                    co_occurrence.setdefault(name, Counter())[other] += 1
    name_of = lambda text: text.removeprefix("Is there an ").removeprefix("Is there a ").removesuffix(" in the image?")  # noqa: E731
    for split, questions in built.items():
        assert len(questions) == 20 * 6
        assert [q.question_id for q in questions] == list(range(1, 121))
        assert [q.label for q in questions] == ["yes", "no"] * 60
        for start in range(0, len(questions), 6):
            group = questions[start : start + 6]
            image = group[0].image
            objects = images[image]
            asked = [name_of(q.text) for q in group]
            assert len(set(asked)) == 6 and {q.image for q in group} == {image}
            assert asked[0::2] == objects[:3]
            for k in range(3):
                negative, before = asked[2 * k + 1], asked[: 2 * k + 1]
                assert negative not in objects and negative in frequency
                allowed = lambda name: name not in objects and name not in before  # noqa: E731
                if split == "popular":
                    best = max(frequency[name] for name in frequency if allowed(name))
                    assert frequency[negative] == best
                elif split == "adversarial":
                    counts = co_occurrence.get(asked[2 * k], Counter())
                    candidates = [name for name in counts if allowed(name)]
                    if candidates:
                        assert counts[negative] == max(counts[name] for name in candidates)


def test_builder_article_and_legacy_typo():
    images = [("a.jpg", ["umbrella", "dog", "apple"]), ("b.jpg", ["cat", "car", "orange"])]
    fixed = pope.build_questions(images, "random", num_images=2)
    legacy = pope.build_questions(images, "random", num_images=2, legacy_article=True)
    texts = {q.text for q in fixed}
    assert "Is there an umbrella in the image?" in texts and "Is there a dog in the image?" in texts
    assert "Is there an umbrella in the imange?" in {q.text for q in legacy}


def test_builder_errors(instances):
    with pytest.raises(EvalInputError, match="only .* images have at least 3 objects; 1000 requested"):
        pope.build_all_splits(instances, num_images=1000)
    with pytest.raises(EvalInputError, match="no negative object left"):
        pope.build_questions([("a.jpg", ["dog", "cat", "cow"])], "random", num_images=1)
    with pytest.raises(EvalInputError, match="unknown POPE split"):
        pope.build_questions([], "hard", num_images=0)


def test_written_questions_load_back(instances, tmp_path):
    built = pope.build_all_splits(instances, seed=2, num_images=10)
    path = tmp_path / "coco_pope_adversarial.json"
    pope.write_questions(path, built["adversarial"])
    loaded = pope.load_questions(path)
    assert records(loaded) == records(built["adversarial"]) and {q.split for q in loaded} == {"adversarial"}
