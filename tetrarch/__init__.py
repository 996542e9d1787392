"""Pure domain logic of the tetrarch agent hierarchy.

Nothing in this package imports Temporal: models, naming, resource arithmetic, policy limits,
the state transitions of every level and the bootstrap file live here so that unit tests hit them
directly and workflows stay thin.
"""
