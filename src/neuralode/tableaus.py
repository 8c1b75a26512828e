"""The Butcher tableaus, under the name they have always had (``neuralode.tableaus``).

They live in :mod:`neuralode.solvers.tableaus`, beside the solver that runs them; this module keeps
the import path that user code and the docs use.
"""

from .solvers.tableaus import (
    TABLEAUS,
    ButcherTableau,
    DenseOutput,
    get_tableau,
    hermite_dense_output,
)

__all__ = ["ButcherTableau", "DenseOutput", "TABLEAUS", "get_tableau", "hermite_dense_output"]
