"""The `ftl` command: one module per verb, registered in `main.py`."""
