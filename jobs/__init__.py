"""jobs: offline work without Ray (datasets, train, evaluate, offline distill, inspect)."""
