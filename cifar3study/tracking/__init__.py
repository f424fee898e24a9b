"""MLflow: the store, runs, provenance, and what each stage logs."""
