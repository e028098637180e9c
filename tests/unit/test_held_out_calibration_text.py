"""The fixtures' calibration text is the held-out tail of what they were trained on
(issue 12, item 4): disjoint from the training part, as the training script splits it."""

import json
import re

import pytest

from mla_plugin.eval.eval_text import is_evaluation_text
from mla_plugin.fixtures import TRAINED_FIXTURES, load_tokenizer, trained_fixture
from mla_plugin.fixtures.training_text import (
    HELD_OUT_NAME,
    TRAIN_FRACTION,
    fixture_token_ids,
    held_out_start,
    training_token_count,
)
from tests.converters import calibration_text
from tests.paths import REPO, wikitext_file


@pytest.fixture(scope="module")
def split():
    """(tokenizer, validation text, its token ids as trained on, the tail's first character)."""
    tokenizer = load_tokenizer()
    text = wikitext_file("valid.tokens.txt").read_text(encoding="utf-8")
    return tokenizer, text, fixture_token_ids(tokenizer, text), held_out_start(tokenizer, text)


def test_the_tail_is_disjoint_from_the_training_tokens(split):
    tokenizer, text, ids, start = split
    trained = training_token_count(len(ids))
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    # every training token (ids[1:trained], after BOS) ends at or before the tail's first character,
    # every held-out token starts at or after it
    assert max(end for _, end in offsets[: trained - 1]) == start
    assert min(begin for begin, _ in offsets[trained - 1:]) >= start
    # the training tokens are exactly the tokens of text[:start]; the tail's are the held-out ones
    assert fixture_token_ids(tokenizer, text[:start]) == ids[:trained]
    assert tokenizer(text[start:], add_special_tokens=False)["input_ids"] == ids[trained:]
    assert 5000 < len(ids) - trained < 8000 and 0 < len(text) - start < 0.03 * len(text)


def test_the_calibration_text_of_the_tests_is_the_tail(split):
    tokenizer, text, _, start = split
    path = calibration_text()
    assert path.name == HELD_OUT_NAME
    assert path.read_text(encoding="utf-8") == text[start:]
    assert not is_evaluation_text(path.read_text(encoding="utf-8"))


def test_the_split_is_the_one_the_fixtures_were_trained_with():
    """The training script splits with the same helper, and each fixture records that fraction."""
    script = (REPO / "scripts/train_tiny_fixtures.py").read_text()
    assert "training_token_count(len(ids))" in script
    for name in TRAINED_FIXTURES:
        recorded = json.loads((trained_fixture(name) / "training.json").read_text())["train_text"]
        percent = re.search(r"first (\d+)%", recorded)
        assert percent and int(percent.group(1)) == round(100 * TRAIN_FRACTION), recorded
