"""Entry points: `python -m jobs.NAME --config FILE [--set k=v ...]`. Thin glue from a config to Ray."""
