"""The package's one exception type for bad input.

Every bad input a user can hand the converters or the perplexity tool (a damaged
safetensors file, a config.json with wrong types, a missing shard, a bad option value)
raises ``MLAPluginInputError`` with a one-line message that says what is wrong and how to
fix it; `mla-plugin` prints it as ``error: <message>`` and exits with code 2.
"""


class MLAPluginInputError(ValueError):
    """Bad input (file, config or option): the message is one line and says how to fix it."""
