"""Temporal workflows: the four levels as entity workflows, and the operations that cross them."""
