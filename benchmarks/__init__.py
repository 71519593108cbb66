"""tracker's benchmarks: programs that print tables, run from the repository's root.

    python -m benchmarks                  # what there is
    python -m benchmarks suite --quick    # one of them, with its options (--help)

benchmarks/README.md says what each figure means and gives the current ones.
"""
