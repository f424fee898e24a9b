"""Measurement beyond the pipeline: the training-speed benchmark and the CUDA op audit."""
