"""Fleet simulation (`pf-sim`): a real coordinator process and real agents in worker processes.

Map: cli.py (flags) -> config.py (SimConfig) -> simulation.py (the one round loop; it reads the
coordinator over HTTP through coordinator_api.py) -> processes.py (coordinator process), pool.py
(device worker pool) -> worker.py (one process plays many devices) -> shards.py (who holds which
samples). Chaos plugs into the loop as hooks (hooks.py, chaos.py: faultproxy.py + httpwire.py,
agent kills, coordinator restarts, the audit); report.py writes the HTML report; replica.py is
the docker-compose device entrypoint (a replica finds its shard from its identity). `pf-sim --stacked`
runs stacked_sim.py instead: in-process rounds, each worker's devices trained as one stacked graph
(stacked.py).
"""
