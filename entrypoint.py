"""Container entrypoint: `apptainer run sft.sif ARGS` ends up here."""
import sys

from sft.cli import main

if __name__ == "__main__":
    sys.exit(main())
