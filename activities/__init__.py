"""Activities: how operation workflows reach a level (an Update on its entity, or I/O)."""
