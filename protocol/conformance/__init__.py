"""The device protocol's conformance suite: a scripted coordinator that checks an agent in any language.

    python -m protocol.conformance --agent-cmd "pf-agent run --coordinator {url} --enrollment-key {key} \\
        --state-dir {state} --data {data} --once --ignore-conditions --holdout 0"

- `server`: a standard-library HTTP server on a loopback port that records every request;
- `world`: what it serves (LeNet from engine.models, a Fashion-MNIST slice as .npz for the agent);
- `scenario`: the default coordinator behaviour and the checks every scenario shares;
- `scenarios`: one small class per rule of docs/protocol.md (deltas only, one upload per task,
  idempotent retries, deadlines, Retry-After, no retry on 4xx, corrupted model refused, caching);
- `suite`: runs the agent per scenario and prints the report, a JSON line last.

It depends on numpy, the engine and protocol/ only (no web framework), so it runs wherever the
protocol package does.
"""

from protocol.conformance.scenarios import SCENARIOS
from protocol.conformance.suite import run_suite

__all__ = ["SCENARIOS", "run_suite"]
