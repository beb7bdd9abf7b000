"""Command-line tools that are not DVC stages: run a profile, summarise, compare runs, measure noise.

The commands are ``profile``, ``summary``, ``compare`` and ``noise``; ``runs`` reads a run (a git
revision, a DVC experiment or the workspace), ``noisefile`` owns the noise file's format and
``rescore`` scores one run's bundle on another's test split (``compare --rescore``).
"""
