"""Planning without a cluster: parameter counts per rank (meta device), memory, step time, the dry run."""
