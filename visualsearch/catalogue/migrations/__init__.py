"""The catalogue's schema migrations (Alembic), run by :func:`visualsearch.catalogue.schema.upgrade`.

``env.py`` runs them on the connection it is given (no ``alembic.ini``); ``versions/``
holds one file per revision, the first of which (:mod:`.baseline`) creates the schema
catalogues had before migrations existed. To add a revision, change the models, then
write ``versions/NNNN_what.py`` by hand or with
``alembic -c <(printf '[alembic]\nscript_location=visualsearch/catalogue/migrations\n') revision -m what``
and make it work on SQLite (batch operations) and PostgreSQL alike. A revision is
immutable once released: it holds (a copy of) every table, index and trigger it
creates, never an import of the current models or of ``counters.py``'s definitions
(revision 0001's are in :mod:`.baseline` and :mod:`.baseline_triggers`).
"""
