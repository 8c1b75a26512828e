"""Datasets, generated or read from local files; nothing is downloaded at run time."""
