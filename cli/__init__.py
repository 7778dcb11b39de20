"""bnfold's command line (installed as ``bnfold.cli``): a thin skin over the library."""
