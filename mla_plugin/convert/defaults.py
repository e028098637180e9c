"""The converters' defaults and vocabularies, one place for the Python API and the CLI.

``convert_mla_to_gla`` / ``convert_gqa_to_mla`` take their keyword defaults from here and
``mla-plugin convert ...`` its argparse defaults, so the two cannot drift apart. No torch
import: the CLI builds its parser from this module without loading the converters.
"""

# What calibration fits (mla-to-gla): nothing, λ per (layer, head, slice), or λ and μ.
CALIBRATE_MODES = ("none", "logit", "logit+output")

# mla-to-gla (DeepSeek-V2 -> sharded latent)
MLA_TO_GLA_SOFTMAX = "partitioned"
MLA_TO_GLA_RMSNORM = "global"
MLA_TO_GLA_BASIS = "hadamard"
MLA_TO_GLA_LOGIT_SCALE = "auto"
MLA_TO_GLA_CALIBRATE = "none"
MLA_TO_GLA_CALIB_TOKENS = 16384
MLA_TO_GLA_CALIB_WINDOW = 256

# gqa-to-mla (Llama / Mistral / Qwen2 -> MLA)
GQA_TO_MLA_FREQFOLD = 1
GQA_TO_MLA_CALIB_TOKENS = 32768
GQA_TO_MLA_CALIB_WINDOW = 256
GQA_TO_MLA_BALANCE = True
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")  # --dtype; None keeps the source's
