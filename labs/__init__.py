"""Lab scripts: measurements and experiments behind docs/RESULTS.md. Not part of the flashlm package (not in the
wheel); run from the repository root as `python -m labs.NAME --help`. Tests may import their helpers."""
