"""Speed benchmarks, run by hand (see README), never by pytest."""
