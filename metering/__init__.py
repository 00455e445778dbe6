"""Every connected second and every cent: counters, call records, metrics."""
