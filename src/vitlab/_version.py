"""The version of vitlab (ground floor: the CLI reads it without importing the whole package)."""

__version__ = "0.1.0"
