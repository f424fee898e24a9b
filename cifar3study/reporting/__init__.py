"""Metrics, the comparison, figures and the offline plots page."""
