"""The model: where its files are, what it costs in memory, how it is loaded for this device, and its loss."""
