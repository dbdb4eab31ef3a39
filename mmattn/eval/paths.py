"""Where the project's shared evaluation data lives.

The data (official POPE files, offline NLTK resources) is too large or too third-party to ship inside the
package, so it sits beside the project in ``../shared/data``. Users and CI can point elsewhere with the
``MMATTN_SHARED_DATA`` environment variable; every public function that reads the data also takes an explicit
path, which wins over both.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "MMATTN_SHARED_DATA"

# mmattn/eval/paths.py -> parents[2] is the project root (the repository checkout).
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The shared data directory: ``explicit``, else ``$MMATTN_SHARED_DATA``, else ``<project>/../shared/data``.

    The directory is not required to exist; callers that need a file report the full path they looked at.
    """
    if explicit is not None:
        return Path(explicit)
    from_env = os.environ.get(SHARED_DATA_ENV)
    if from_env:
        return Path(from_env)
    return PROJECT_ROOT.parent / "shared" / "data"


def pope_coco_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding the official ``coco_pope_{random,popular,adversarial}.json`` files."""
    return shared_data_dir(explicit) / "pope" / "coco"


def nltk_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The offline ``nltk_data`` copy in the shared data (punkt_tab, perceptron tagger, WordNet 3.0)."""
    return shared_data_dir(explicit) / "nltk_data"
