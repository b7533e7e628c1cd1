"""`python -m train.export output_dir=<run> export.dir=<dir> [export.step=N] [export.dtype=bfloat16]
[export.overwrite=true]`: the command line of train/hf/export.py (a run's checkpoint as a Hugging Face
directory)."""

import sys

from .hf.export import main

if __name__ == "__main__":
    sys.exit(main())
