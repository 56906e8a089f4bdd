"""Training: from photos (``photometric``), per-cell distillation from a teacher
(``distill``), and the stages, budgets and checkpoints of a run (``pipeline``)."""
