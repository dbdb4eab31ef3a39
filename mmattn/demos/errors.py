"""How the demos turn failures into messages: the user sees a sentence, the server log keeps the traceback."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import gradio as gr


class DemoInputError(ValueError):
    """A problem with what the user gave (image, prompt, options): shown to them as a message."""


@contextlib.contextmanager
def errors_as_messages(what: str, logger: logging.Logger) -> Iterator[None]:
    """Re-raise failures inside the block as ``gr.Error`` messages (works around ``yield`` too)."""
    try:
        yield
    except DemoInputError as error:
        raise gr.Error(str(error), print_exception=False) from None
    except (ValueError, TypeError, RuntimeError) as error:
        # e.g. methods that cannot be combined, an option a model does not support
        logger.warning("%s failed: %s", what, error, exc_info=True)
        raise gr.Error(f"{type(error).__name__}: {error}", print_exception=False) from None
    except Exception as error:  # noqa: BLE001 - a message for the user, the traceback for the log
        logger.exception("%s failed", what)
        raise gr.Error(f"the run failed ({type(error).__name__}); see the server log", print_exception=False) from None
