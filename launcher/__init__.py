"""ftl, the fine-tuning launcher."""

__version__ = "0.1.0"
