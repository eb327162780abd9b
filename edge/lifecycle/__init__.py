"""Trusting a model on the line: its golden set and self-test, shadow runs beside the live model,
promotion and rollback of the model store, the audit log, and the `python -m edge golden|promote|
rollback|shadow-report` commands. The daemon calls in here; nothing here is on a part's way."""
