"""Errors the package raises on bad input, in a leaf module every layer can import."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""
