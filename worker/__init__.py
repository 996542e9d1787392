"""Workers: one per level (its task queue), or all four in one process for development."""
