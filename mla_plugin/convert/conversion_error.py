"""The one error type of the converters (its own module so that source.py, destination.py and
pipeline.py can all raise it without importing one another in a loop)."""

from mla_plugin.errors import MLAPluginInputError


class ConversionError(MLAPluginInputError):
    """Bad input for a converter: the message says what and how to fix it."""
