"""The run directory and every file in it: name, lock, manifest, checkpoints, records, report, listing, cleaning."""
