"""Which attention backend a checkpoint's declared attention needs, and refusing any other.

A checkpoint (or ``--hf-overrides``) whose ``mla_plugin`` entry declares a sharded latent
that computes something other than MLA (partitioned or grouped softmax, the local RMSNorm;
checkpoint_format.sharded_latent_changes_function) is computed only by MLA_PLUGIN_GLA. A
checkpoint converted from GQA (checkpoint_format.LatentCheckpointFormat not stock) is
computed by vLLM's DeepSeek-V2 attention with its format applied, under any MLA backend
but the sharded-latent one. Any other explicit request would serve a different model, so
it fails at start-up with one message naming the flag that serves it.
"""

from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME
from mla_plugin.checkpoint_format import describe_sharded_latent, format_of, sharded_latent_changes_function
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.gla_options import CONFIG_KEY


class WrongBackendError(MLAPluginInputError):
    """The requested attention backend would compute a different model than the checkpoint's."""


def needs_sharded_latent(hf_config, tp_size: int | None) -> bool:
    return sharded_latent_changes_function(getattr(hf_config, CONFIG_KEY, None), tp_size=tp_size)


def declared_backend(hf_config) -> str | None:
    """The backend a checkpoint picks for itself when none is requested: MLA_PLUGIN_GLA for the
    sharded-latent layout (or sharded-latent options that change the attention), MLA_PLUGIN for
    one converted from GQA (any latent width; vLLM's own CPU backend takes only 512 + 64)."""
    options = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        return None
    if options.get("layout") == "sharded_latent" or sharded_latent_changes_function(options):
        return GLA_BACKEND_NAME
    if not format_of(hf_config).is_stock:
        return MLA_BACKEND_NAME
    return None


def check_requested_backend(model: str, hf_config, requested: str | None, tp_size: int | None) -> None:
    """Raise WrongBackendError when the explicitly requested backend (an AttentionBackendEnum
    member name, any case; None: no request) cannot compute this checkpoint."""
    if requested is None:
        return
    asked = requested.upper()
    flag = f"--attention-backend {asked.lower()}"
    if asked != GLA_BACKEND_NAME and needs_sharded_latent(hf_config, tp_size):
        raise WrongBackendError(
            f"{model} declares a sharded-latent attention ({describe_sharded_latent(getattr(hf_config, CONFIG_KEY))}) "
            f"that only the {GLA_BACKEND_NAME} backend computes; {flag} would serve a different model. "
            f"Pass --attention-backend {GLA_BACKEND_NAME.lower()}, or leave out --attention-backend.")
    if asked == GLA_BACKEND_NAME and isinstance(getattr(hf_config, CONFIG_KEY, None), dict) \
            and not format_of(hf_config).is_stock:
        raise WrongBackendError(
            f"{model} was converted from a GQA/MHA model (no latent RMSNorm, biases or its own rope "
            f"frequencies), which the {GLA_BACKEND_NAME} backend does not compute. Pass --attention-backend "
            f"{MLA_BACKEND_NAME.lower()}, or leave out --attention-backend.")


def check_layer_backend(hf_config, *, sharded_layer: bool, tp_size: int) -> None:
    """Last line of defence where a DeepSeek-V2 attention layer is built: vLLM's own MLA layer
    for a checkpoint that needs the sharded latent is refused (whatever path led there)."""
    if not sharded_layer and needs_sharded_latent(hf_config, tp_size):
        raise WrongBackendError(
            f"this checkpoint declares a sharded-latent attention "
            f"({describe_sharded_latent(getattr(hf_config, CONFIG_KEY))}) that only the {GLA_BACKEND_NAME} "
            f"backend computes; pass --attention-backend {GLA_BACKEND_NAME.lower()}, or leave out "
            "--attention-backend.")
