"""Write mla_plugin/eval/wikitext2_test_lines.bin: the fingerprint by which the converters
recognise the evaluation text (the wikitext-2-raw-v1 test split) when it is passed as
calibration text.

One 4-byte BLAKE2b digest per paragraph of at least 80 characters (stripped), sorted.

    python scripts/make_eval_text_fingerprint.py [../shared/data/wikitext-2/test.raw.txt]
"""

import sys
from pathlib import Path

from mla_plugin.eval.eval_text import FINGERPRINT, fingerprint_lines

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared/data/wikitext-2/test.raw.txt"
    digests = sorted(fingerprint_lines(source.read_text(encoding="utf-8")))
    FINGERPRINT.write_bytes(b"".join(digests))
    print(f"{len(digests)} paragraph digests of {source} -> {FINGERPRINT}")


if __name__ == "__main__":
    main()
