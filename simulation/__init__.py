"""Fleet simulation (`pf-sim`): a real coordinator process and real agents in worker processes.

Map: cli.py (flags) -> simulation.py (the round loop) -> processes.py (coordinator process),
pool.py (device worker pool) -> worker.py (one process plays many devices) -> shards.py (who holds which
samples); report.py writes the HTML report; replica.py is the docker-compose device
entrypoint (a replica finds its shard from its identity).
"""
