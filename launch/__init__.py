"""Launching runs: one node, several nodes (torchrun, c10d rendezvous), SLURM (sbatch). `python -m launch`."""
