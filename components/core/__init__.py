"""Core: what every other layer stands on, and nothing above it.

Settings (`config` and its sections, `overrides`, `credentials`, `settings` for the machine), the hand-off
files (`contracts`, and `paths`, the one table of where each stage reads and writes), files written
atomically, content hashes, user-facing errors, process set-up and progress, and MLflow tracking
(`tracking.stage_run`, the one stage-run lifecycle; `tracking_connection`; `pipeline_runs`).
"""
