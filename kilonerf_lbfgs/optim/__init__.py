"""Optimisers: the batched per-cell L-BFGS and its parts."""
from .compact import compact_coefficients, two_loop_direction
from .lbfgs import BatchedLBFGS, Hyperparameters, LBFGSState, check_hyperparameters
from .linesearch import LINE_SEARCHES, LineSearchState, cubic_minimizer, line_search_update

__all__ = ["BatchedLBFGS", "LBFGSState", "Hyperparameters", "check_hyperparameters",
           "compact_coefficients", "two_loop_direction", "LINE_SEARCHES", "LineSearchState",
           "cubic_minimizer", "line_search_update"]
