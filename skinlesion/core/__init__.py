"""Plumbing every layer uses: the HAM10000 schema, errors, atomic outputs, CLI, process pool,
table and image reading."""
