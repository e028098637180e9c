"""Checkpoint converters (no vLLM import).

    mla_to_gla.py           DeepSeek-V2 (MLA) -> the sharded-latent layout
    gqa_to_mla.py           Llama / Mistral / Qwen2 (GQA, MHA) -> MLA; per-layer math in gqa_latent.py
    pipeline.py             the stages both share: source, destination, progress, streamed
                            writes, index, side files
    source.py               a source checkpoint: config.json, headers, tensors read one by one
    destination.py          DST written atomically: locked, staged beside DST, renamed into place
    conversion_error.py     ConversionError, the converters' one-line user error
    calibration_fit.py      calibration math (plain torch); calibration_capture.py: the
                            transformers run that feeds it
    defaults.py             the defaults the Python API and `mla-plugin convert` share
    safetensors_stream.py   safetensors read / written one tensor at a time
"""
