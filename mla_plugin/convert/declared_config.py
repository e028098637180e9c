"""Writing a converted checkpoint's config.json so that it says what its weights mean.

Both converters end here: the config declares the architecture its weights compute
(checkpoint_format.declare_architecture: DeepseekV2ForCausalLM when it is an ordinary
DeepSeek-V2, else MLAPluginDeepseekV2ForCausalLM with an auto_map), and a checkpoint
that is not ordinary gets the transformers modeling file that computes it beside its weights.
"""

import json
import shutil
from pathlib import Path

from mla_plugin.checkpoint_format import REMOTE_CODE_FILE, declare_architecture

REMOTE_CODE = Path(__file__).with_name(REMOTE_CODE_FILE)


def write_config(dst: Path, config: dict) -> dict:
    """Declare the architecture, write config.json (and the modeling file if needed) into dst."""
    if declare_architecture(config):
        shutil.copy2(REMOTE_CODE, Path(dst) / REMOTE_CODE_FILE)
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
