"""Data: reading rows, formats (alpaca, chat, completion, text classification), collators."""
