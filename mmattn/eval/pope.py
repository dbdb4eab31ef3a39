"""POPE (Li et al., EMNLP 2023): polling-based object-probing questions, answer parsing and metrics.

Published POPE numbers differ partly because the scoring copies parse free-form answers differently, and
because several versions of the COCO question files are in use. So the parser is a named option and the file
version can be identified (:func:`question_file_version`):

``official`` (default): RUCAIBox/POPE ``evaluate.py`` = LLaVA ``eval_pope.py``
    Keep the text before the first '.', drop commas, split on spaces; the answer is *no* iff a token is exactly
    ``No``, ``not`` or ``no``. Case- and punctuation-sensitive: "NO", "Not sure." and "There isn't a car." are
    *yes*.
``opera``: OPERA / PAI / HALC ``recorder``
    Drop every '.' and ',', split on spaces; *no* iff a token is in {No, not, no, NO} or ends with "n't".
    Reads all sentences: "Yes. There is no dog." is *no*.
``vcd``: VCD ``eval_pope.py``
    Label-conditioned substring test on the lower-cased answer: a gold-yes question is answered yes iff "yes"
    occurs in it; a gold-no question is answered no iff "no" occurs in it ("not", "know", "nothing" count).

Metrics per split treat "yes" as the positive class; every division is guarded (0.0 on an empty denominator;
the reference scripts raise ZeroDivisionError when nothing is predicted yes).

The question builder follows RUCAIBox/POPE ``main.py`` / ``utils.py`` on any COCO-format instances file, but
seeded: the reference sets no seed, so its published files are the canonical artefacts, not its script.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _stdio
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .io import EvalInputError, PathLike, iter_jsonl, read_json, read_records, write_jsonl_atomic
from .paths import pope_coco_dir

__all__ = [
    "SPLITS",
    "PARSERS",
    "DEFAULT_PARSER",
    "TEMPLATE",
    "PopeQuestion",
    "load_questions",
    "load_official_split",
    "attach_labels",
    "load_answers",
    "parse_official",
    "parse_opera",
    "parse_vcd",
    "predict_yes",
    "pope_metrics",
    "score_pope",
    "evaluate_pope",
    "question_file_version",
    "image_objects_from_coco",
    "build_questions",
    "build_all_splits",
    "write_questions",
]

SPLITS = ("random", "popular", "adversarial")
PARSERS = ("official", "opera", "vcd")
DEFAULT_PARSER = "official"
TEMPLATE = "Is there a {} in the image?"
LABELS = ("yes", "no")

# sha256 of the file with CRLF turned into LF -> (split, RUCAIBox/POPE commit that produced it). Lets a result
# say which file version it was scored on: LLaVA-1.5 and OPERA pin e3e3926 (random has 2,910 questions), the
# current HEAD 109985c has 3,000 per split, VCD ships HEAD random/popular and the edebdda adversarial file.
_KNOWN_FILES = {
    "b65021b4425a6b2ae77703a39f19868978c2c2320379ea5e36600f0fc1e62a7c": ("random", "e3e3926"),
    "7bb5ad04f3c58e13a726942a6779224f2f03520611d6733efb88fc597ccf3bb2": ("popular", "e3e3926"),
    "9ca9c075445ce7fa090c7d191816584b23ad8ebad537e80229e5926fe07a6f76": ("adversarial", "e3e3926"),
    "185d7eb49958c882f15d46c51d5c0456fbd5efbf24c57ff8b7adc6648870c6ac": ("adversarial", "edebdda"),
    "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994": ("random", "109985c"),
    "fa3a986eb3d586ceb527371112ad7170f398835cbe0a3f08a7e888771dbd8bd6": ("popular", "109985c"),
    "44bfb0b27f0d438e15164be7fea25addf46d31885be46e15af02fa7ffaa48b60": ("adversarial", "109985c"),
}


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question. ``label`` is "yes"/"no" or None (LLaVA's combined file carries no labels);
    ``split`` is the category (random / popular / adversarial, or a file-derived name)."""

    question_id: int | str
    image: str
    text: str
    label: str | None
    split: str
    where: str = ""

    def to_record(self) -> dict[str, Any]:
        """The official file's JSON object (question_id, image, text, label)."""
        record: dict[str, Any] = {"question_id": self.question_id, "image": self.image, "text": self.text}
        if self.label is not None:
            record["label"] = self.label
        return record


# -------------------------------------------------------------------------------------------- loading


def _question_id(value: Any, where: str) -> int | str:
    """Question ids are matched between files; normalise "12" and 12 to the same key."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EvalInputError(f"{where}: question_id must be an integer or a string, got {value!r}")
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            raise EvalInputError(f"{where}: empty question_id")
        return int(stripped) if stripped.isdigit() else stripped
    return value


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in LABELS:
        raise EvalInputError(f"{where}: label must be 'yes' or 'no', got {value!r}")
    return value.strip().lower()


def split_from_path(path: PathLike) -> str:
    """random / popular / adversarial when the file name says so (``coco_pope_random.json``), else its stem."""
    stem = Path(path).stem
    found = [split for split in SPLITS if re.search(rf"(^|[_\-.]){split}($|[_\-.])", stem)]
    return found[0] if len(found) == 1 else stem


def load_questions(path: PathLike, split: str | None = None) -> list[PopeQuestion]:
    """Questions from an official POPE file (JSON Lines, LF or CRLF), a JSON array (SEEM files) or LLaVA's
    combined ``llava_pope_test.jsonl`` (records carry ``category`` and no ``label``).

    The split of each question is its ``category`` when present, else ``split``, else the file name's split.
    """
    default_split = split or split_from_path(path)
    questions = []
    seen: dict[int | str, str] = {}
    for line_number, record in read_records(path):
        where = f"{path}:{line_number}"
        if "question_id" not in record:
            raise EvalInputError(f"{where}: no 'question_id' key")
        question_id = _question_id(record["question_id"], where)
        if question_id in seen:
            raise EvalInputError(f"{where}: duplicate question_id {question_id!r} (first at {seen[question_id]})")
        seen[question_id] = where
        text = record.get("text", "")
        image = record.get("image", "")
        if not isinstance(text, str) or not isinstance(image, str):
            raise EvalInputError(f"{where}: 'text' and 'image' must be strings")
        label = _label(record["label"], where) if "label" in record else None
        category = record.get("category", default_split)
        if not isinstance(category, str) or not category:
            raise EvalInputError(f"{where}: 'category' must be a non-empty string")
        questions.append(PopeQuestion(question_id, image, text, label, category, where))
    if not questions:
        raise EvalInputError(f"{path}: no questions")
    return questions


def load_official_split(split: str, directory: PathLike | None = None) -> list[PopeQuestion]:
    """The official COCO file ``coco_pope_{split}.json`` from ``directory`` (default: the shared data)."""
    if split not in SPLITS:
        raise EvalInputError(f"unknown POPE split {split!r}; choose one of {', '.join(SPLITS)}")
    path = (Path(directory) if directory is not None else pope_coco_dir()) / f"coco_pope_{split}.json"
    return load_questions(path, split)


def attach_labels(questions: Sequence[PopeQuestion], labels_dir: PathLike) -> list[PopeQuestion]:
    """Label questions by LLaVA's convention: the k-th question of category c (in question-file order) takes the
    label of the k-th line of ``labels_dir/coco_pope_{c}.json``.

    The pairing is positional, so it is checked: the counts must agree and so must the image of each pair. A
    mismatch usually means a different POPE file version (LLaVA's combined file pins e3e3926, whose random split
    has 2,910 questions; the current files have 3,000).
    """
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise EvalInputError(f"{labels_dir}: labels directory not found")
    by_split: dict[str, list[PopeQuestion]] = {}
    for question in questions:
        by_split.setdefault(question.split, []).append(question)
    labelled: dict[int | str, PopeQuestion] = {}
    for split, members in by_split.items():
        label_path = labels_dir / f"coco_pope_{split}.json"
        if not label_path.is_file():
            raise EvalInputError(f"unknown category {split!r}: {label_path} not found")
        references = load_questions(label_path, split)
        if len(references) != len(members):
            raise EvalInputError(
                f"category {split!r}: {len(members)} questions but {len(references)} labels in {label_path} "
                "(different POPE file versions?)"
            )
        for question, reference in zip(members, references):
            if reference.label is None:
                raise EvalInputError(f"{reference.where}: no 'label'")
            if question.image and reference.image and question.image != reference.image:
                raise EvalInputError(
                    f"{question.where}: image {question.image!r} but the matching label line {reference.where} is "
                    f"for {reference.image!r} (different POPE file versions?)"
                )
            labelled[question.question_id] = replace(question, label=reference.label)
    return [labelled[question.question_id] for question in questions]


def load_answers(path: PathLike, answer_key: str | None = None) -> dict[int | str, str]:
    """``question_id -> answer text`` from a JSON Lines file.

    The answer is read from ``answer_key`` when given, else from ``answer`` (RUCAIBox) or ``text`` (LLaVA).
    """
    answers: dict[int | str, str] = {}
    where_of: dict[int | str, str] = {}
    for line_number, record in iter_jsonl(path):
        where = f"{path}:{line_number}"
        if "question_id" not in record:
            raise EvalInputError(f"{where}: no 'question_id' key")
        question_id = _question_id(record["question_id"], where)
        keys = (answer_key,) if answer_key else ("answer", "text")
        key = next((k for k in keys if k in record), None)
        if key is None:
            raise EvalInputError(f"{where}: no answer (looked for {', '.join(repr(k) for k in keys)})")
        if not isinstance(record[key], str):
            raise EvalInputError(f"{where}: answer {key!r} must be a string, got {type(record[key]).__name__}")
        if question_id in answers:
            raise EvalInputError(
                f"{where}: second answer for question_id {question_id!r} (first at {where_of[question_id]})"
            )
        answers[question_id] = record[key]
        where_of[question_id] = where
    if not answers:
        raise EvalInputError(f"{path}: no answers")
    return answers


def question_file_version(path: PathLike) -> tuple[str, str] | None:
    """``(split, RUCAIBox/POPE commit)`` of a known official COCO question file, whatever its line endings."""
    digest = hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()
    return _KNOWN_FILES.get(digest)


# -------------------------------------------------------------------------------------------- parsing


def parse_official(answer: str) -> bool:
    """RUCAIBox ``evaluate.py`` / LLaVA ``eval_pope.py``: True for yes."""
    if "." in answer:
        answer = answer.split(".")[0]
    words = answer.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


_OPERA_NEGATIONS = frozenset(("No", "not", "no", "NO"))


def parse_opera(answer: str) -> bool:
    """OPERA / PAI / HALC ``recorder``: True for yes."""
    words = answer.replace(".", "").replace(",", "").split(" ")
    return not any(word in _OPERA_NEGATIONS or word.endswith("n't") for word in words)


def parse_vcd(answer: str, label: str) -> bool:
    """VCD ``eval_pope.py``: the predicted answer as VCD's counting implies it, given the gold label."""
    answer = answer.lower().strip()
    if label == "yes":
        return "yes" in answer
    return "no" not in answer


def predict_yes(answer: str, label: str, parser: str = DEFAULT_PARSER) -> bool:
    """Whether ``answer`` counts as "yes" under ``parser`` (only ``vcd`` looks at the gold label)."""
    if parser == "official":
        return parse_official(answer)
    if parser == "opera":
        return parse_opera(answer)
    if parser == "vcd":
        return parse_vcd(answer, label)
    raise EvalInputError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")


# -------------------------------------------------------------------------------------------- metrics


def pope_metrics(pairs: Iterable[tuple[bool, bool]]) -> dict[str, float | int]:
    """Metrics from ``(predicted_yes, gold_yes)`` pairs; "yes" is the positive class."""
    tp = fp = tn = fn = 0
    for predicted, gold in pairs:
        if predicted and gold:
            tp += 1
        elif predicted:
            fp += 1
        elif gold:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def score_pope(
    questions: Sequence[PopeQuestion],
    answers: Mapping[int | str, str],
    parser: str = DEFAULT_PARSER,
    *,
    allow_partial: bool = False,
) -> dict[str, dict[str, float | int]]:
    """Metrics per split, answers matched to questions by question_id.

    Every answer must belong to a question. A split with no answers at all is left out (a combined question
    file scored on one split's answers). A split with only some questions answered is an error unless
    ``allow_partial`` (its numbers would not be comparable with published ones); then only the answered
    questions count.
    """
    if parser not in PARSERS:
        raise EvalInputError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")
    by_id = {question.question_id: question for question in questions}
    unknown = [question_id for question_id in answers if question_id not in by_id]
    if unknown:
        shown = ", ".join(repr(question_id) for question_id in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise EvalInputError(f"{len(unknown)} answers for unknown question ids ({shown})")
    by_split: dict[str, list[PopeQuestion]] = {}
    for question in questions:
        by_split.setdefault(question.split, []).append(question)
    results: dict[str, dict[str, float | int]] = {}
    ordered = [s for s in SPLITS if s in by_split] + [s for s in by_split if s not in SPLITS]
    for split in ordered:
        members = by_split[split]
        answered = [question for question in members if question.question_id in answers]
        if not answered:
            continue
        if len(answered) != len(members) and not allow_partial:
            missing = [question.question_id for question in members if question.question_id not in answers]
            raise EvalInputError(
                f"split {split!r}: {len(missing)} of {len(members)} questions have no answer "
                f"(first: {missing[0]!r}); allow_partial (--allow-partial) scores only the answered ones"
            )
        pairs = []
        for question in answered:
            if question.label is None:
                raise EvalInputError(f"{question.where}: question has no label (give the label directory: --labels DIR, labels_dir=)")
            pairs.append((predict_yes(answers[question.question_id], question.label, parser), question.label == "yes"))
        results[split] = pope_metrics(pairs)
    return results


def evaluate_pope(
    answers: PathLike,
    questions: PathLike,
    labels_dir: PathLike | None = None,
    parser: str = DEFAULT_PARSER,
    *,
    answer_key: str | None = None,
    allow_partial: bool = False,
) -> dict[str, dict[str, float | int]]:
    """Score an answers JSONL against a question file (labels inline, or from ``labels_dir`` as LLaVA does)."""
    if parser not in PARSERS:
        raise EvalInputError(f"unknown POPE parser {parser!r}; choose one of {', '.join(PARSERS)}")
    loaded = load_questions(questions)
    if labels_dir is not None:
        loaded = attach_labels(loaded, labels_dir)
    return score_pope(loaded, load_answers(answers, answer_key), parser, allow_partial=allow_partial)


# ------------------------------------------------------------------------------------------- building


def image_objects_from_coco(instances: PathLike) -> list[tuple[str, list[str]]]:
    """``(file_name, [category names])`` per image of a COCO-format instances file, images by ascending id,
    names distinct in annotation order (the order that decides which objects become positives)."""
    from pycocotools.coco import COCO

    data = read_json(instances)
    if not isinstance(data, dict) or not all(key in data for key in ("images", "annotations", "categories")):
        raise EvalInputError(f"{instances}: not a COCO instances file (needs images, annotations, categories)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(_stdio.StringIO()):  # pycocotools prints progress
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise EvalInputError(f"{instances}: malformed COCO annotations ({type(error).__name__}: {error})") from None
    names = {category["id"]: category["name"] for category in coco.dataset["categories"]}
    result = []
    for image_id in sorted(coco.imgs):
        objects: list[str] = []
        for annotation in coco.imgToAnns.get(image_id, ()):
            name = names.get(annotation.get("category_id"))
            if name is None:
                raise EvalInputError(f"{instances}: annotation {annotation.get('id')} has an unknown category_id")
            if name not in objects:
                objects.append(name)
        result.append((coco.imgs[image_id].get("file_name", str(image_id)), objects))
    return result


def _question_text(template: str, name: str, legacy_article: bool) -> str:
    if not name or name[0] not in "aeiou":
        return template.format(name)
    if legacy_article:
        # RUCAIBox replaced every "a" of the template, which produced "in the imange?" in the early files.
        return template.replace("a", "an").format(name)
    return template.replace("a {}", "an {}").format(name)


def build_questions(
    images: Sequence[tuple[str, Sequence[str]]],
    split: str,
    *,
    seed: int = 0,
    num_images: int = 500,
    positives_per_image: int = 3,
    template: str = TEMPLATE,
    legacy_article: bool = False,
) -> list[PopeQuestion]:
    """POPE questions for one split, as RUCAIBox/POPE builds them, deterministic given ``seed``.

    Images with at least ``positives_per_image`` objects are sampled (``num_images`` of them, the same images
    for every split of one seed). For each image the first objects are asked as positives, each followed by one
    negative that is neither in the image nor already asked: uniform over all objects of the sampled images
    (random), the most frequent one (popular), or the one co-occurring most often with the positive
    (adversarial); the last two fall back to random. Set ``legacy_article`` to reproduce the early files'
    "imange" typo.
    """
    if split not in SPLITS:
        raise EvalInputError(f"unknown POPE split {split!r}; choose one of {', '.join(SPLITS)}")
    eligible = [(image, list(objects)) for image, objects in images if len(objects) >= positives_per_image]
    if len(eligible) < num_images:
        raise EvalInputError(
            f"only {len(eligible)} images have at least {positives_per_image} objects; {num_images} requested"
        )
    chosen = random.Random(seed).sample(eligible, num_images)
    rng = random.Random(f"{seed}:{split}")

    frequency = Counter(name for _, objects in chosen for name in objects)  # insertion order = first seen
    pool = list(frequency)
    by_popularity = [name for name, _ in sorted(frequency.items(), key=lambda item: item[1], reverse=True)]
    co_occurrence: dict[str, Counter[str]] = {}
    for _, objects in chosen:
        for name in objects:
            counts = co_occurrence.setdefault(name, Counter())
            for other in objects:
                if other != name:
                    counts[other] += 1
    by_co_occurrence = {
        name: [other for other, _ in sorted(counts.items(), key=lambda item: item[1], reverse=True)]
        for name, counts in co_occurrence.items()
    }

    questions: list[PopeQuestion] = []
    for image, objects in chosen:
        asked: list[str] = []
        for positive in objects[:positives_per_image]:
            asked.append(positive)
            text = _question_text(template, positive, legacy_article)
            questions.append(PopeQuestion(len(questions) + 1, image, text, "yes", split))
            if split == "popular":
                ranked = by_popularity
            elif split == "adversarial":
                ranked = by_co_occurrence.get(positive, [])
            else:
                ranked = []
            excluded = set(objects).union(asked)  # never in the image, never asked twice
            negative = next((name for name in ranked if name not in excluded), None)
            if negative is None:
                candidates = [name for name in pool if name not in excluded]
                if not candidates:
                    raise EvalInputError(f"no negative object left for image {image!r}: too few distinct objects")
                negative = rng.choice(candidates)
            asked.append(negative)
            text = _question_text(template, negative, legacy_article)
            questions.append(PopeQuestion(len(questions) + 1, image, text, "no", split))
    return questions


def build_all_splits(
    instances: PathLike, *, seed: int = 0, num_images: int = 500, **options: Any
) -> dict[str, list[PopeQuestion]]:
    """The three splits from one COCO-format instances file (same sampled images for all three)."""
    images = image_objects_from_coco(instances)
    return {split: build_questions(images, split, seed=seed, num_images=num_images, **options) for split in SPLITS}


def write_questions(path: PathLike, questions: Iterable[PopeQuestion]) -> None:
    """Write questions in the official JSON Lines format, atomically."""
    write_jsonl_atomic(path, (question.to_record() for question in questions))
