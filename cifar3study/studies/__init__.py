"""Studies: a study file's trials as DVC experiments scheduled by Ray, and the study's report."""
