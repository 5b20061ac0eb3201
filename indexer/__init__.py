"""Batch indexing and the ``visualsearch`` command line: parse options, call the library, print."""
