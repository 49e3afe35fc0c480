"""A single-node SLURM cluster for the tests (``cluster.py``)."""
