"""pocketfed's coordinator: a FastAPI service that runs federated rounds and serves the model.

Map: settings.py (options) -> app.py (create_app) -> routers/ (HTTP, one file per area) ->
rounds.py (the round state machine) -> strategies/ (one class per algorithm) and storage/
(SQLite + immutable model files). validation.py guards uploads; metrics.py and
routers/dashboard.py show what happens.
"""
