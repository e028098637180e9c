"""Writing a converted checkpoint's config.json so that it says what its weights mean.

Both converters end here: the config declares the architecture its weights compute
(checkpoint_format.declare_architecture: DeepseekV2ForCausalLM when it is an ordinary
DeepSeek-V2, else MLAPluginDeepseekV2ForCausalLM with an auto_map), and a checkpoint
that is not ordinary gets the transformers modeling file that computes it beside its weights.

DeepSeek-V3-style sources (model_type deepseek_v3: sigmoid routing with a correction bias)
keep their own names: an ordinary conversion stays DeepseekV3ForCausalLM, and one that is
not declares MLAPluginDeepseekV2ForCausalLM (the one name the plugin registers with vLLM,
whose DeepSeek model class reads V3's routing from the config) with an auto_map to the
modeling file's V3 class, so transformers builds V3's MoE around the sharded latent.
"""

import json
import shutil
from pathlib import Path

from mla_plugin.checkpoint_format import REMOTE_CODE_FILE, declare_architecture

REMOTE_CODE = Path(__file__).with_name(REMOTE_CODE_FILE)
V3_MODEL_TYPE = "deepseek_v3"
V3_ARCHITECTURE = "DeepseekV3ForCausalLM"
V3_CONVERTED_CLASS = "MLAPluginDeepseekV3ForCausalLM"  # in modeling_mla_plugin.py


def write_config(dst: Path, config: dict) -> dict:
    """Declare the architecture, write config.json (and the modeling file if needed) into dst."""
    needs_code = declare_architecture(config)
    if config.get("model_type") == V3_MODEL_TYPE:
        if needs_code:
            config["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.{V3_CONVERTED_CLASS}"}
        else:
            config["architectures"] = [V3_ARCHITECTURE]
    if needs_code:
        shutil.copy2(REMOTE_CODE, Path(dst) / REMOTE_CODE_FILE)
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
