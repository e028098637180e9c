"""Text into token windows, as the perplexity protocol cuts it (docs/design.md, "Perplexity protocol").

The whole text is tokenized once with BOS only at the very start, then cut into
non-overlapping windows of exactly ``window`` tokens (stride = window, remainder
dropped). The perplexity tool scores these windows; the converters calibrate on windows
cut the same way from train or validation text.

Imports neither vLLM nor transformers: the tokenizer is passed in.
"""


def tokenize_once(tokenizer, text: str) -> list[int]:
    """The whole text as one token sequence, BOS only at the very start."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


def make_windows(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of exactly ``window`` tokens; the remainder is dropped."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def calibration_windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """The converters' calibration windows: at most ``tokens // window`` of them, at least one."""
    return make_windows(ids, window, max(1, tokens // window))
