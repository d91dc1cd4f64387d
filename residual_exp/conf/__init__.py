"""Hydra configs shipped with the package (``config_path="conf"``; ``pkg://residual_exp.conf``)."""
