"""Recognise the evaluation text by its content, so no converter calibrates on it.

The perplexity protocol scores the wikitext-2-raw-v1 test split; calibrating a
conversion on that text would tune the converted model to the very text it is then
scored on. The fingerprint (wikitext2_test_lines.bin, written by
scripts/make_eval_text_fingerprint.py) holds a 4-byte digest of every test-split
paragraph of at least 80 characters; a calibration text sharing enough of those
paragraphs is the evaluation text (or an excerpt of it).
"""

import hashlib
from functools import lru_cache
from pathlib import Path

from mla_plugin.errors import MLAPluginInputError

FINGERPRINT = Path(__file__).with_name("wikitext2_test_lines.bin")
MIN_PARAGRAPH_CHARS = 80
MATCHES_TO_REFUSE = 3  # shared paragraphs (or every long paragraph of a shorter text)


def fingerprint_lines(text: str) -> set[bytes]:
    """The 4-byte digests of ``text``'s paragraphs of at least MIN_PARAGRAPH_CHARS characters."""
    return {hashlib.blake2b(line.encode(), digest_size=4).digest()
            for line in map(str.strip, text.split("\n")) if len(line) >= MIN_PARAGRAPH_CHARS}


@lru_cache(maxsize=1)
def _evaluation_digests() -> frozenset[bytes]:
    raw = FINGERPRINT.read_bytes()
    return frozenset(raw[i : i + 4] for i in range(0, len(raw), 4))


def is_evaluation_text(text: str) -> bool:
    """Whether ``text`` is the wikitext-2 test split, or an excerpt of it, by content."""
    mine = fingerprint_lines(text)
    shared = len(mine & _evaluation_digests())
    return shared > 0 and shared >= min(MATCHES_TO_REFUSE, len(mine))


def check_calibration_text(text: str, path, *, allow_eval_text: bool) -> None:
    """Refuse the evaluation text as calibration text unless the user allows it."""
    if not allow_eval_text and is_evaluation_text(text):
        raise MLAPluginInputError(
            f"calibration text {path} is the evaluation text (the wikitext-2 test split the ppl protocol scores); "
            "calibrate on train or validation text, or pass --allow-eval-text (allow_eval_text=True) to do it anyway")
