"""Analyses of a model and a batch (exclusivity, rank); registered covariates live here."""
