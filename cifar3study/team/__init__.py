"""A team's shared stack on loopback: PostgreSQL, S3, an MLflow server and a DVC remote."""
