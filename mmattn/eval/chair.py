"""CHAIR object-hallucination metrics (Rohrbach, Hendricks et al., EMNLP 2018), with reference parity.

Published CHAIR numbers come from several copies of one script that differ in how caption tokens are
normalised; the difference moves CHAIR_s by up to a few points. Both normalisers are available and every
per-caption record names the one used:

``opera`` (default)
    ``nltk.word_tokenize`` -> ``nltk.pos_tag`` -> ``WordNetLemmatizer.lemmatize(token, pos)``, as in
    shikiw/OPERA ``chair.py`` (also PAI, HALC). The variant most LVLM papers report. Note "men" stays "men"
    and is therefore not a person word; "skiing" becomes "ski" and fires *skis*.
``original``
    ``nltk.word_tokenize`` -> ``pattern.en.singularize`` (re-implemented in :mod:`.singularize`), as in
    LisaAnne/Hallucination and Maxlinn/CHAIR-metric-standalone. "bus" becomes "bu" and is missed.

Everything else follows the reference copies exactly, quirks included, because the published tables were made
with them: the synonym list is parsed as shipped (``" motor bike"`` and ``" cheesecake"`` keep their leading
space and never match, ``iPhone`` never matches a lower-cased caption), the double-word table is greedy and
left-to-right ("train track" and "home plate" absorb their words, "baby"/"adult" + animal and "passenger" +
vehicle are not persons), and "seat" is dropped whenever "toilet" is present. Ground truth per image is the
union of the COCO instance categories and the objects found (with the same normaliser) in the human captions.

Metrics (fractions, except ``Len``):

* CHAIRs = captions with at least one hallucinated mention / captions.
* CHAIRi = hallucinated mentions / mentions (repeats count each time).
* Recall = sum over captions of distinct correct objects / sum of ground-truth set sizes.
* Precision = sum of distinct correct objects / sum of distinct mentioned objects (PAI).
* F1 = 2PR / (P + R).
* Len = mean number of tokens per caption after the double-word merge, punctuation included (OPERA's "Len";
  OPERA stores it x0.01, we report the plain mean).

Empty denominators give 0.0 (the reference scripts divide by zero).
"""

from __future__ import annotations

import contextlib
import io as _stdio
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .io import EvalInputError, PathLike, read_json, read_records
from .paths import nltk_data_dir

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANT",
    "MissingNLTKData",
    "SynonymTable",
    "CaptionWords",
    "CaptionRecord",
    "ChairResult",
    "ObjectExtractor",
    "load_synonyms",
    "double_word_table",
    "ground_truth_from_coco",
    "ground_truth_from_json",
    "load_ground_truth",
    "load_captions",
    "score_captions",
    "evaluate_chair",
]

VARIANTS = ("opera", "original")
DEFAULT_VARIANT = "opera"

# Greedy two-token merges shared by every CHAIR copy (LisaAnne/Hallucination utils/chair.py). Entries map to
# themselves unless overridden below; several are not objects at all and exist to *absorb* their words.
_COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
# "baby X" / "adult X" -> X so that "baby" or "adult" does not fire *person*.
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
# "passenger X" -> X so that "passenger" does not fire *person*.
_VEHICLE_WORDS = ("jet", "train")
_DOUBLE_WORD_OVERRIDES = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}


class MissingNLTKData(EvalInputError):
    """An NLTK resource that the chosen CHAIR normaliser needs is not installed."""


# ------------------------------------------------------------------------------------------ vocabulary


@dataclass(frozen=True)
class SynonymTable:
    """CHAIR's object vocabulary: every synonym (surface word) and the COCO category ("node word") it names."""

    node_of: Mapping[str, str]
    categories: tuple[str, ...]

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(self.node_of)


def load_synonyms(path: PathLike | None = None) -> SynonymTable:
    """Parse a CHAIR synonyms file (default: the copy shipped in the package).

    Format: one COCO category per line, first entry the category name, entries separated by ``", "``. Each line
    is stripped and split exactly like the reference, so entries preceded by a double space keep a leading
    space and can never match (a documented quirk of the reference numbers).
    """
    if path is None:
        text = resources.files("mmattn.eval").joinpath("data/synonyms.txt").read_text(encoding="utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EvalInputError(f"{path}: no such file") from None
    node_of: dict[str, str] = {}
    categories: list[str] = []
    for line in text.splitlines():
        entries = line.strip().split(", ")
        if entries == [""]:
            continue
        categories.append(entries[0])
        for entry in entries:
            node_of[entry] = entries[0]
    return SynonymTable(node_of=node_of, categories=tuple(categories))


def double_word_table() -> dict[str, str]:
    """The reference double-word dictionary: merged two-token phrase -> the word it stands for."""
    table = {phrase: phrase for phrase in _COCO_DOUBLE_WORDS}
    for animal in _ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table.update(_DOUBLE_WORD_OVERRIDES)
    return table


# -------------------------------------------------------------------------------------------------- NLTK


def _nltk_resources(variant: str) -> list[tuple[str, str]]:
    """(path for nltk.data.find, downloader id) pairs that ``variant`` needs, for the installed nltk."""
    import nltk

    major, minor = (int(part) for part in nltk.__version__.split(".")[:2])
    # nltk 3.9 replaced the pickled resources with punkt_tab and a JSON perceptron tagger.
    new_names = (major, minor) >= (3, 9)
    needed = [("tokenizers/punkt_tab/english/", "punkt_tab") if new_names else ("tokenizers/punkt/", "punkt")]
    if variant == "opera":
        needed.append(
            ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng")
            if new_names
            else ("taggers/averaged_perceptron_tagger/", "averaged_perceptron_tagger")
        )
        needed.append(("corpora/wordnet/", "wordnet"))
    return needed


def _prepare_nltk(variant: str) -> None:
    """Make the NLTK resources findable and fail early, with the fix, when they are not.

    nltk reads ``NLTK_DATA`` only when it is first imported; reading it again here lets callers (and tests) set
    it later. The project's offline copy in the shared data directory is used as a last resort.
    """
    import nltk

    search = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    for directory in reversed(search):
        if directory not in nltk.data.path:
            nltk.data.path.insert(0, directory)
    shared = str(nltk_data_dir())
    if os.path.isdir(shared) and shared not in nltk.data.path:
        nltk.data.path.append(shared)

    needed = _nltk_resources(variant)
    missing = []
    for resource, package in needed:
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(package)
    if missing:
        all_packages = " ".join(package for _, package in needed)
        raise MissingNLTKData(
            f"CHAIR variant '{variant}' needs NLTK data not found ({', '.join(missing)}); fetch it with "
            f"`python -m nltk.downloader {all_packages}`, or set NLTK_DATA to a directory that has it "
            f"(the project's offline copy: {shared})"
        )


def _wordnet_pos(tag: str) -> str:
    """Penn tag -> WordNet POS as OPERA maps it (anything that is not J/V/N/R is lemmatised as a noun)."""
    if tag.startswith("J"):
        return "a"
    if tag.startswith("V"):
        return "v"
    if tag.startswith("R"):
        return "r"
    return "n"


# ------------------------------------------------------------------------------------- word extraction


@dataclass(frozen=True)
class CaptionWords:
    """What CHAIR reads from one caption.

    ``words`` is the full token list after normalisation and the double-word merge (what OPERA's ``Len``
    counts); ``object_words`` are the mentions that are in the vocabulary, ``node_words`` their COCO categories
    (same length, one per mention) and ``token_indices`` the index of each mention's first token in the
    tokenised caption.
    """

    words: list[str]
    object_words: list[str]
    node_words: list[str]
    token_indices: list[int]


class ObjectExtractor:
    """Caption -> CHAIR object mentions, with one of the two reference normalisers."""

    def __init__(self, variant: str = DEFAULT_VARIANT, synonyms: SynonymTable | None = None):
        if variant not in VARIANTS:
            raise EvalInputError(f"unknown CHAIR variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        _prepare_nltk(variant)
        self.variant = variant
        self.synonyms = synonyms or load_synonyms()
        self._vocabulary = self.synonyms.vocabulary
        self._double_words = double_word_table()
        if variant == "opera":
            from nltk.stem import WordNetLemmatizer

            self._lemmatizer = WordNetLemmatizer()

    def normalise(self, caption: str) -> list[str]:
        """Lower-case, tokenise and normalise (lemmatise or singularise) each token."""
        import nltk

        try:
            tokens = nltk.word_tokenize(caption.lower())
            if self.variant == "opera":
                return [
                    self._lemmatizer.lemmatize(token, pos=_wordnet_pos(tag)) for token, tag in nltk.pos_tag(tokens)
                ]
        except LookupError as error:  # data removed after the check, or an nltk naming we did not foresee
            raise MissingNLTKData(f"NLTK data missing: {str(error).strip().splitlines()[0]}") from None
        from .singularize import singularize

        return [singularize(token) for token in tokens]

    def extract(self, caption: str) -> CaptionWords:
        """Normalise, merge double words, apply the toilet-seat rule and keep the vocabulary words."""
        tokens = self.normalise(caption)
        merged: list[str] = []
        starts: list[int] = []
        i = 0
        while i < len(tokens):
            starts.append(i)
            pair = " ".join(tokens[i : i + 2])
            if pair in self._double_words:
                merged.append(self._double_words[pair])
                i += 2
            else:
                merged.append(tokens[i])
                i += 1
        # "the seat of the toilet" must not fire *chair*.
        drop_seat = "toilet" in merged and "seat" in merged
        object_words, node_words, token_indices = [], [], []
        for word, start in zip(merged, starts):
            if drop_seat and word == "seat":
                continue
            if word in self._vocabulary:
                object_words.append(word)
                node_words.append(self.synonyms.node_of[word])
                # The reference copies misalign these indices after a dropped "seat"; we keep them aligned.
                token_indices.append(start)
        return CaptionWords(words=merged, object_words=object_words, node_words=node_words, token_indices=token_indices)


# ---------------------------------------------------------------------------------------- ground truth


def _image_id(value: Any, where: str) -> int:
    """COCO image ids are integers; JSON object keys and some dumps carry them as digit strings."""
    if isinstance(value, bool):
        raise EvalInputError(f"{where}: image id must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise EvalInputError(f"{where}: image id must be an integer COCO id, got {value!r}")


def _coco_index(path: Path, required: Sequence[str]):
    """Load one COCO-format JSON with pycocotools, reporting malformed files as EvalInputError."""
    from pycocotools.coco import COCO

    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: not a COCO annotation file (top level is {type(data).__name__})")
    for key in required:
        if key not in data:
            raise EvalInputError(f"{path}: not a COCO annotation file (no {key!r} list)")
    coco = COCO()
    coco.dataset = data
    try:
        # pycocotools reports progress on stdout, which the CLI reserves for its JSON result.
        with contextlib.redirect_stdout(_stdio.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise EvalInputError(f"{path}: malformed COCO annotations ({type(error).__name__}: {error})") from None
    return coco


def ground_truth_from_coco(
    directory: PathLike,
    extractor: ObjectExtractor,
    image_ids: Iterable[int] | None = None,
) -> dict[int, set[str]]:
    """Ground-truth objects per image from every ``instances_*.json`` and ``captions_*.json`` in ``directory``.

    COCO 2014 and 2017 files both work (same image ids); all files found are merged, as the reference merges
    train and val. Only ``image_ids`` are computed when given (the result for an evaluated image is the same
    as the reference's all-images build, and it avoids normalising ~600k human captions). Every image listed
    in any file gets an entry, empty if nothing was found; ids absent from all files are absent from the result.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EvalInputError(f"{directory}: annotations directory not found")
    instance_files = sorted(directory.glob("instances_*.json"))
    caption_files = sorted(directory.glob("captions_*.json"))
    if not instance_files or not caption_files:
        kinds = (("instances_*.json", instance_files), ("captions_*.json", caption_files))
        absent = " and ".join(pattern for pattern, files in kinds if not files)
        raise EvalInputError(f"{directory}: no {absent} found (CHAIR needs COCO instances and captions)")
    wanted = None if image_ids is None else set(image_ids)
    objects: dict[int, set[str]] = {}

    def selected(coco) -> Iterable[int]:
        present = set(coco.imgs) | set(coco.imgToAnns)
        return present if wanted is None else present & wanted

    for path in instance_files:
        coco = _coco_index(path, ("images", "annotations", "categories"))
        names = {category["id"]: category["name"] for category in coco.dataset["categories"]}
        for image_id in selected(coco):
            found = objects.setdefault(image_id, set())
            for annotation in coco.imgToAnns.get(image_id, ()):
                name = names.get(annotation.get("category_id"))
                if name is None:
                    raise EvalInputError(
                        f"{path}: annotation {annotation.get('id')} has unknown category_id "
                        f"{annotation.get('category_id')!r}"
                    )
                node = extractor.synonyms.node_of.get(name)
                if node is None:
                    raise EvalInputError(f"{path}: category {name!r} is not one of CHAIR's COCO objects")
                found.add(node)
    for path in caption_files:
        coco = _coco_index(path, ("images", "annotations"))
        for image_id in selected(coco):
            found = objects.setdefault(image_id, set())
            for annotation in coco.imgToAnns.get(image_id, ()):
                caption = annotation.get("caption")
                if not isinstance(caption, str):
                    raise EvalInputError(f"{path}: annotation {annotation.get('id')} has no caption text")
                found.update(extractor.extract(caption).node_words)
    return objects


def ground_truth_from_json(path: PathLike, extractor: ObjectExtractor) -> dict[int, set[str]]:
    """Ground truth from a precomputed JSON object ``{image_id: [object, ...]}``.

    Objects may be COCO category names or any CHAIR synonym (mapped to its category); anything else is an error
    rather than a silently unmatchable object.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: expected a JSON object {{image_id: [objects]}}")
    objects: dict[int, set[str]] = {}
    for key, names in data.items():
        image_id = _image_id(key, f"{path}: key {key!r}")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise EvalInputError(f"{path}: image {key}: expected a list of object names")
        found = objects.setdefault(image_id, set())
        for name in names:
            node = extractor.synonyms.node_of.get(name)
            if node is None:
                raise EvalInputError(f"{path}: image {key}: {name!r} is not a CHAIR object word")
            found.add(node)
    return objects


def load_ground_truth(
    annotations: PathLike, extractor: ObjectExtractor, image_ids: Iterable[int] | None = None
) -> dict[int, set[str]]:
    """Ground truth from a COCO annotations directory or a ``{image_id: [objects]}`` JSON file."""
    path = Path(annotations)
    if path.is_dir():
        return ground_truth_from_coco(path, extractor, image_ids)
    if path.is_file():
        return ground_truth_from_json(path, extractor)
    raise EvalInputError(f"{path}: annotations not found (expected a COCO annotations directory or a JSON file)")


# ---------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CaptionRecord:
    """One generated caption to score; ``where`` locates it in its input file for error messages."""

    image_id: int
    caption: str
    where: str = ""


@dataclass
class ChairResult:
    """Overall metrics (``summary``: CHAIRs, CHAIRi, Recall, Len, Precision, F1, n) and per-caption records."""

    summary: dict[str, float | int]
    per_caption: list[dict[str, Any]] = field(default_factory=list)
    variant: str = DEFAULT_VARIANT


def load_captions(path: PathLike, image_id_key: str = "image_id", caption_key: str = "caption") -> list[CaptionRecord]:
    """Generated captions from JSON Lines (or a JSON array) of objects; every record is validated here."""
    records = []
    for line_number, record in read_records(path):
        where = f"{path}:{line_number}"
        if image_id_key not in record:
            raise EvalInputError(f"{where}: no {image_id_key!r} key")
        if caption_key not in record:
            raise EvalInputError(f"{where}: no {caption_key!r} key")
        caption = record[caption_key]
        if not isinstance(caption, str):
            raise EvalInputError(f"{where}: {caption_key!r} must be a string, got {type(caption).__name__}")
        if not caption.strip():
            raise EvalInputError(f"{where}: empty caption")
        records.append(CaptionRecord(_image_id(record[image_id_key], where), caption, where))
    if not records:
        raise EvalInputError(f"{path}: no captions")
    return records


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def score_captions(
    captions: Sequence[CaptionRecord],
    ground_truth: Mapping[int, set[str]],
    extractor: ObjectExtractor,
    *,
    allow_unknown_images: bool = False,
) -> ChairResult:
    """CHAIR over ``captions`` against ``ground_truth`` (see the module docstring for the formulas).

    An image id missing from the ground truth is an error by default: the reference scores it against an empty
    set (every mention hallucinated), which is almost always a wrong id key or a wrong annotation split.
    """
    if not captions:
        raise EvalInputError("no captions to score")
    mentions = hallucinated_mentions = hallucinated_captions = 0
    correct_objects = gt_objects_total = mentioned_objects = merged_tokens = 0
    per_caption = []
    for record in captions:
        if not isinstance(record.caption, str) or not record.caption.strip():
            raise EvalInputError(f"{record.where or f'image {record.image_id}'}: empty caption")
        if record.image_id not in ground_truth and not allow_unknown_images:
            raise EvalInputError(
                f"{record.where or 'caption'}: image id {record.image_id} is not in the ground-truth annotations"
            )
        gt = ground_truth.get(record.image_id, set())
        found = extractor.extract(record.caption)
        hallucinated = [
            (word, node) for word, node in zip(found.object_words, found.node_words) if node not in gt
        ]
        indices = [index for index, node in zip(found.token_indices, found.node_words) if node not in gt]
        distinct = set(found.node_words)
        correct = distinct & gt

        mentions += len(found.node_words)
        hallucinated_mentions += len(hallucinated)
        hallucinated_captions += bool(hallucinated)
        correct_objects += len(correct)
        gt_objects_total += len(gt)
        mentioned_objects += len(distinct)
        merged_tokens += len(found.words)

        precision = _ratio(len(correct), len(distinct))
        recall = _ratio(len(correct), len(gt))
        per_caption.append(
            {
                "image_id": record.image_id,
                "caption": record.caption,
                "variant": extractor.variant,
                "words": found.words,
                "mscoco_generated_words": found.node_words,
                "mscoco_gt_words": sorted(gt),
                "mscoco_hallucinated_words": [list(pair) for pair in hallucinated],
                "hallucination_idxs": indices,
                "metrics": {
                    "CHAIRs": int(bool(hallucinated)),
                    "CHAIRi": _ratio(len(hallucinated), len(found.node_words)),
                    "Recall": recall,
                    "Precision": precision,
                    "F1": _f1(precision, recall),
                    "Len": len(found.words),
                },
            }
        )
    precision = _ratio(correct_objects, mentioned_objects)
    recall = _ratio(correct_objects, gt_objects_total)
    summary = {
        "CHAIRs": hallucinated_captions / len(captions),
        "CHAIRi": _ratio(hallucinated_mentions, mentions),
        "Recall": recall,
        "Len": merged_tokens / len(captions),
        "Precision": precision,
        "F1": _f1(precision, recall),
        "n": len(captions),
    }
    return ChairResult(summary=summary, per_caption=per_caption, variant=extractor.variant)


def evaluate_chair(
    captions: PathLike | Sequence[CaptionRecord],
    annotations: PathLike,
    variant: str = DEFAULT_VARIANT,
    *,
    image_id_key: str = "image_id",
    caption_key: str = "caption",
    synonyms: PathLike | None = None,
    allow_unknown_images: bool = False,
) -> ChairResult:
    """Score a captions file (or records) against COCO annotations (directory) or a ground-truth JSON file."""
    if isinstance(captions, (str, os.PathLike)):
        records = load_captions(captions, image_id_key, caption_key)
    else:
        records = list(captions)
    extractor = ObjectExtractor(variant, load_synonyms(synonyms) if synonyms is not None else None)
    ground_truth = load_ground_truth(annotations, extractor, {record.image_id for record in records})
    return score_captions(records, ground_truth, extractor, allow_unknown_images=allow_unknown_images)
