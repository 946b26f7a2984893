"""What the public page says about the model: its title, description and clickable example images.

Examples come from ``LOUPE_EXAMPLES_DIR`` (a folder of images for the user's own model) or, for the demo, its
digits. They are checked once at start with the same decoder and limits as uploads, so a file the app would refuse
from a user is never offered as an example: unreadable ones are skipped with a log line, and at most
``max_examples`` are shown (the first by file name).
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.imageio import ImageRejected, decode_image

log = logging.getLogger("loupe.examples")

DEMO_DESCRIPTION = "Handwritten digits: draw a digit (0 to 9) in the Draw tab, or upload a picture of one."
# More than this and the header's class list stops being readable: "… and 40 more".
LISTED_CLASSES = 12


def examples_folder(settings) -> Path | None:
    if settings.examples_dir is not None:
        return Path(settings.examples_dir)
    if settings.model_path is None:
        from model.demo import DEMO_EXAMPLES_DIR

        return Path(DEMO_EXAMPLES_DIR)
    return None


def load_examples(settings) -> list[str]:
    """Paths of the example images to offer, each one checked as an upload would be."""
    folder = examples_folder(settings)
    if folder is None or settings.max_examples == 0:
        return []
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as e:
        log.warning("Examples folder %s cannot be read (%s): no examples shown.", folder, e.strerror or e)
        return []
    accepted: list[str] = []
    for path in files:
        if len(accepted) == settings.max_examples:
            log.info("Showing the first %d of %d files in %s as examples (LOUPE_MAX_EXAMPLES).",
                     settings.max_examples, len(files), folder)
            break
        try:
            with open(path, "rb") as f:
                data = f.read(settings.max_upload_bytes + 1)  # decode_image tells "too large" from "at the limit"
            decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        except OSError as e:
            log.warning("Example %s skipped: it cannot be read (%s).", path, e.strerror or e)
            continue
        except ImageRejected as e:
            log.warning("Example %s skipped: %s", path, e.args[0])
            continue
        accepted.append(str(path))
    if not accepted and files:
        log.warning("None of the %d files in %s can be shown as an example.", len(files), folder)
    return accepted


def describe(settings, vocab) -> str:
    """The line under the title: the configured description, the demo's, or the classes it tells apart."""
    if settings.model_description:
        return settings.model_description
    if settings.model_path is None:
        return DEMO_DESCRIPTION
    names = ", ".join(vocab[:LISTED_CLASSES])
    more = f" and {len(vocab) - LISTED_CLASSES} more" if len(vocab) > LISTED_CLASSES else ""
    return f"Tells apart {len(vocab)} classes: {names}{more}."
