"""Analyses of refusal directions across modalities; each returns a labeled `xarray.Dataset`."""
