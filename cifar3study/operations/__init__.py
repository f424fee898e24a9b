"""Running the study beyond one `dvc repro`: benchmark, team stack."""
