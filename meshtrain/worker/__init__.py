"""The worker process that runs one rank of a job's user script (see runtime.py)."""
