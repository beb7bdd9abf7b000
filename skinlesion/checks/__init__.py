"""Checks on the data: what the split, validate and drift stages decide with.

Split: near-duplicate detection (duplicates) and the leakage-free, lesion-grouped assignment
(leakage). Validate: the Great Expectations suites (suites) on per-file facts (imagefacts), run by
gx, told to the user by validation_report. Drift: drift, drift_metadata, drift_report.
"""
