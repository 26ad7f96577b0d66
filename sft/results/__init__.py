"""Using finished runs: predict, export, compare, reproduce, dashboards and notebooks."""
