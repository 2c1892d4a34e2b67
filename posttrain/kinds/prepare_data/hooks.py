"""What `prepare_data` knows about its own runs, for plan, the console and the report. Never part of a
key: no stage module imports this file, so editing a label rebuilds nothing."""
from __future__ import annotations

HEADLINE_METRICS = ("decontaminated_rows",)
