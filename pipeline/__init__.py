"""TGS Salt Identification pipeline: data -> folds -> k-fold UNets -> OOF tuning -> TTA -> submission."""

__version__ = "0.1.0"
