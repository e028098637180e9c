"""Where the tests find the shared wikitext-2 data (../shared beside the checkout)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = Path(os.environ.get("MLA_PLUGIN_WIKITEXT_DIR", REPO.parent / "shared/data/wikitext-2"))


def wikitext_file(name: str) -> Path:
    path = WIKITEXT_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the tests need ../shared/data/wikitext-2 beside the checkout "
            "(or MLA_PLUGIN_WIKITEXT_DIR pointing at it)"
        )
    return path
