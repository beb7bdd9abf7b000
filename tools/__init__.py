"""Command-line tools that are not DVC stages: run a profile, summarise, compare runs, measure noise."""
