"""The package version, recorded in every manifest and in the data cache key."""
__version__ = "0.1.0"  # as pyproject.toml
