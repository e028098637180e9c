"""Text into token windows, as the perplexity protocol cuts it (docs/design.md, "Perplexity protocol").

The whole text is tokenized once with BOS only at the very start, then cut into
non-overlapping windows of exactly ``window`` tokens (stride = window, remainder
dropped). The perplexity tool scores these windows; the converters calibrate on windows
cut the same way from train or validation text.

Imports neither vLLM nor transformers: the tokenizer is passed in.
"""

from pathlib import Path

from mla_plugin.errors import MLAPluginInputError


def read_text_file(path) -> str:
    """A UTF-8 text file (evaluation or calibration text); a missing or non-UTF-8 file is an
    ``MLAPluginInputError``."""
    path = Path(path)
    if not path.is_file():
        raise MLAPluginInputError(f"text file {path} does not exist (give a UTF-8 text file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MLAPluginInputError(f"text file {path} is not UTF-8 (byte {err.start}: "
                                  f"{err.object[err.start:err.start + 1]!r}); convert it to UTF-8") from None


def tokenize_once(tokenizer, text: str) -> list[int]:
    """The whole text as one token sequence, BOS only at the very start."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def make_windows(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly ``window`` tokens; the remainder is dropped."""
    if window < 2:
        raise MLAPluginInputError(f"window must be at least 2 tokens, got {window}")
    if max_windows is not None and max_windows < 1:
        raise MLAPluginInputError(f"max_windows must be a positive integer (or omitted for all windows), "
                                  f"got {max_windows}")
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise MLAPluginInputError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def calibration_windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """The converters' calibration windows: at most ``tokens // window`` of them, at least one."""
    return make_windows(ids, window, max(1, tokens // window))
