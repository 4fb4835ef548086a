"""Data: image decoding, data sets, transforms, ROI extraction, synthetic anomalies."""
