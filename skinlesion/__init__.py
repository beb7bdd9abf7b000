"""The library the DVC stages (stages/), flows (flows/), tools (tools/) and serve/ use.

Layers, lowest first; a layer imports only the layers before it (tests/unit/project/test_layout.py):
core (schema, errors, atomic outputs, CLI, process pool, tables, image decode), params (the typed
params.yaml, one module per section), sources (where images come from), measure (NumPy/pandas
metrics, scoring, calibration, the model card), checks (data checks: duplicates, the lesion split's
leakage, the Great Expectations suites, drift), model (everything TensorFlow, and the bundle).
"""
