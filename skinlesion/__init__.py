"""The library the DVC stages (stages/), flows (flows/), tools (tools/) and serve/ use.

Layers, lowest first: core (schema, params-free plumbing), params (the typed params.yaml),
sources (where images come from), checks (data suites), measure (NumPy metrics), model
(everything TensorFlow). A layer imports only the layers before it.
"""
