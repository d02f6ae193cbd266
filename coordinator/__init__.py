"""pocketfed's coordinator: a FastAPI service that runs federated rounds and serves the model.

Map (imports run downwards only):
    __main__.py     pf-coordinator: flags generated from settings.py (pydantic-settings, PF_* variables)
    api/            FastAPI: app factory, one router per resource, dependencies, error handlers, middleware
    service/        round lifecycle, model versions, check-in, ingest (validation + group-commit writer),
                    admin, privacy ledger, evaluation, background ticking
    strategies/     one class per aggregation algorithm; norm bounding and DP wrap any of them
    store/          every SQL statement (SQLAlchemy Core, SQLite or PostgreSQL), typed rows, migrations,
                    the immutable model files (BlobStore), and the advisory locks replicas share
    metrics.py      prometheus-client registry per app; audit.py checks the books from the database

Any number of replicas may run on one PostgreSQL database (service/cluster.py, service/aggregates.py,
store/locks.py); on SQLite there is one process.
"""
