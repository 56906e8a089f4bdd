"""Optimisers: the batched per-cell L-BFGS and its parts."""
from .compact import compact_coefficients, two_loop_direction
from .lbfgs import BatchedLBFGS
from .linesearch import LINE_SEARCHES, cubic_minimizer, line_search_update

__all__ = ["BatchedLBFGS", "compact_coefficients", "two_loop_direction", "LINE_SEARCHES",
           "cubic_minimizer", "line_search_update"]
