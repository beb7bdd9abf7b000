"""NumPy/pandas only: metrics, scoring, paired comparisons, calibration, image features, the model card."""
