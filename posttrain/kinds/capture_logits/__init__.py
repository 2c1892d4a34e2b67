"""The `capture_logits` stage kind: its config and declaration (`stage.py`), its body (`run.py`) and its
hooks for plan, console and report (`hooks.py`)."""
