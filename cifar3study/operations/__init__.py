"""Running the study beyond one `dvc repro`: benchmark, op audit, team stack, reproducing a run, studies on Ray."""
