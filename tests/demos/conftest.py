"""Fixtures for the demo tests: a tiny LLaVA checkpoint and the LVLM demo served on a free local port.

The checkpoint is random (``mmattn.testing.save_tiny_llava_checkpoint``), so answers are noise; everything else
(processor, prompting, patching, streaming, CHAIR against the offline world's ground truth) is the real path.
CHAIR needs the project's offline NLTK data (``../shared/data/nltk_data`` or ``$MMATTN_SHARED_DATA``); when it is
missing the tests fail with a message, never skip.
"""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from mmattn.testing import save_tiny_llava_checkpoint

    path = tmp_path_factory.mktemp("tiny_llava")
    save_tiny_llava_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def nltk_available():
    from mmattn.eval.chair import ObjectExtractor
    from mmattn.eval.io import EvalInputError

    try:
        ObjectExtractor()
    except EvalInputError as error:
        pytest.fail(f"CHAIR's NLTK data is missing, so hallucinated objects cannot be computed: {error}", pytrace=False)


@pytest.fixture(scope="session")
def lvlm_demo(tiny_checkpoint, nltk_available):
    from mmattn.demos.lvlm import LVLMDemo

    demo = LVLMDemo.from_pretrained(str(tiny_checkpoint), device="cpu", default_max_new_tokens=6)
    assert demo.examples is not None, "the offline world's val images are missing (mmattn/eval/world/data/val)"
    return demo


@pytest.fixture(scope="session")
def lvlm_server(lvlm_demo):
    """(demo, base URL) of the LVLM demo launched on 127.0.0.1 for the whole session."""
    from mmattn.demos.lvlm import launch

    app = launch(lvlm_demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        yield lvlm_demo, app.local_url
    finally:
        app.close()
