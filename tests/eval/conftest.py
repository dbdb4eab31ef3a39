"""Fixtures for the evaluator tests: the project's shared data, offline NLTK data, and a tiny fake COCO.

The shared data (``../shared/data`` beside the repository, or ``$MMATTN_SHARED_DATA``) is part of the project's
test setup: when it is missing the tests fail with a message saying where it was looked for, never skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_path() -> Path:
    from_env = os.environ.get("MMATTN_SHARED_DATA")
    return Path(from_env) if from_env else REPO_ROOT.parent / "shared" / "data"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"project shared data missing: {path} (expected ../shared/data beside the repository, "
            "or set MMATTN_SHARED_DATA)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require(shared_data_path())


@pytest.fixture(scope="session")
def pope_dir(shared_data: Path) -> Path:
    return require(shared_data / "pope" / "coco")


@pytest.fixture(scope="session")
def nltk_data(shared_data: Path):
    """Point NLTK_DATA at the offline copy for the whole session (the evaluators re-read it at use)."""
    path = require(shared_data / "nltk_data")
    previous = os.environ.get("NLTK_DATA")
    os.environ["NLTK_DATA"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("NLTK_DATA", None)
    else:
        os.environ["NLTK_DATA"] = previous


@pytest.fixture(scope="session")
def extractors(nltk_data):
    from mmattn.eval.chair import ObjectExtractor

    return {variant: ObjectExtractor(variant) for variant in ("opera", "original")}


# The 80 COCO categories with their ids (instances_*.json "categories"), in id order.
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]  # fmt: skip

# specs/evaluators.md §5.1: image id -> (instance categories, human captions). 1-6 in val, 7-12 in train.
SYNTHETIC_IMAGES = {
    1: (["person", "horse", "horse"], ["A man riding a brown horse.", "A person on a horse on the beach."]),
    2: (["person", "person", "dog", "couch"], ["Two men sitting on a sofa with a puppy."]),
    3: (["hot dog", "wine glass", "dining table"], ["A hot dog and a glass of wine on a table."]),
    4: (["teddy bear", "bed"], ["A teddy bear lying on a bed."]),
    5: (["elephant", "elephant"], ["A baby elephant walking with an adult elephant."]),
    6: (["toilet", "sink"], ["A white toilet with the seat up next to a sink."]),
    7: (["train"], ["A passenger train pulling into the station."]),
    8: (["person", "skis"], ["A skier going down a snowy slope."]),
    9: (["bus", "car"], ["A city bus driving down the street."]),
    10: (["motorcycle", "traffic light"], ["A motorcycle parked under a traffic light."]),
    11: (["person", "frisbee"], ["A man throwing a frisbee to his dog."]),
    12: ([], ["A view of the cloudy sky."]),
}

SYNTHETIC_CAPTIONS = {
    1: "A man is riding a horse on the beach. There is a dog running next to him.",
    2: "Two men are sitting on a couch with a dog. A table is next to them.",
    3: "A hot dog on a plate next to a wine glass and a cup.",
    4: "A teddy bear sitting on a bed next to a bear.",
    5: "A baby elephant walking with an adult elephant.",
    6: "The seat of the toilet is up, next to a sink and a chair.",
    7: "A passenger train on the train tracks.",
    8: "A man skiing down a snowy hill.",
    9: "A red bus and two buses parked on the street.",
    10: "A motor bike parked near a traffic light and a stop sign.",
    11: "A person playing tennis with a tennis racket and people watching.",
    12: "A view of the sky.",
}


def write_fake_coco(directory: Path, year: str = "2014") -> Path:
    """COCO-format instances/captions files for the §5.1 images, split over val (1-6) and train (7-12)."""
    directory.mkdir(parents=True, exist_ok=True)
    category_id = {name: cid for cid, name in COCO_CATEGORIES}
    categories = [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in COCO_CATEGORIES]
    annotation_id = 1
    for split, ids in (("val", range(1, 7)), ("train", range(7, 13))):
        images = [
            {"id": i, "file_name": f"COCO_{split}{year}_{i:012d}.jpg", "width": 640, "height": 480} for i in ids
        ]
        instances, captions = [], []
        for i in ids:
            names, human = SYNTHETIC_IMAGES[i]
            for name in names:
                instances.append(
                    {"id": annotation_id, "image_id": i, "category_id": category_id[name], "bbox": [0, 0, 10, 10],
                     "area": 100.0, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 10, 10]]}
                )  # fmt: skip
                annotation_id += 1
            for text in human:
                captions.append({"id": annotation_id, "image_id": i, "caption": text})
                annotation_id += 1
        info = {"description": "synthetic"}
        (directory / f"instances_{split}{year}.json").write_text(
            json.dumps({"info": info, "images": images, "annotations": instances, "categories": categories})
        )
        (directory / f"captions_{split}{year}.json").write_text(
            json.dumps({"info": info, "images": images, "annotations": captions})
        )
    return directory


@pytest.fixture(scope="session")
def fake_coco(tmp_path_factory) -> Path:
    return write_fake_coco(tmp_path_factory.mktemp("coco") / "annotations")


@pytest.fixture(scope="session")
def synthetic_captions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in SYNTHETIC_CAPTIONS.items()))
    return path
