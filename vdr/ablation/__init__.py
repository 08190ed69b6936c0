"""``vdr ablate``: a grid of ``vdr fit`` runs over one config stack, resumable, summarized in a CSV, a table and plots.

``grid`` reads and expands the grid file, ``runner`` launches one run and measures it, ``metrics`` reads its
validation curves, ``record`` keeps each run's state on disk, ``report`` writes the CSV, the markdown table and the
plots, ``summary`` is the callback each run reports its peak GPU memory with, and ``command`` ties them together.
"""
