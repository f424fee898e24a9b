"""The CIFAR-3 FC-vs-CNN study: everything the DVC stages in `stages/` call.

Data:      download (fetch + MD5), safe_pickle + archive (CIFAR-10 python batches), dataset (splits, channel stats)
Models:    models (architectures), speedups (measured CPU/GPU tricks), device (device, seeds, numerics)
Training:  training (the loop), history (per-epoch CSV), checkpoint (.pt format), run_info (train -> later stages)
Results:   evaluation (metrics files), report (comparison table), figures + conv_views (matplotlib), tracking (MLflow)
Plumbing:  params (params.yaml), errors + cli (one-line errors), files (atomic writes)
"""
