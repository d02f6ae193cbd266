"""The device contract: what a device and the coordinator must agree on, and nothing else
(specified for any language in docs/protocol.md).

- `protocol.messages`: the JSON messages (Task, CheckinAnswer, UploadReceipt) as plain dataclasses
  that a device can parse without pydantic;
- `protocol.update`: the update wire format (a checked tensor container holding the encoded delta);
- `protocol.deltas`: the math a delta goes through on either side (norm, clip, noise, top-k, int8).
- `protocol.conformance`: a scripted coordinator that checks any agent against docs/protocol.md
  (`python -m protocol.conformance --agent-cmd "..."`);
- `protocol.secagg`: secure aggregation (SecAgg+ sessions for device and coordinator, distributed
  DP noise); it needs the `secagg` extra (`cryptography`) and nothing else here imports it.

It sits between the engine (whose tensor container it uses) and both the device agent and the
coordinator; it imports neither of them.
"""
