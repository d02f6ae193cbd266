"""Secure aggregation (SecAgg+): the coordinator learns the sum of a cohort's updates, not one of them.

The protocol core, pure and without I/O: the device agent drives a `ClientSession`, the
coordinator a `ServerSession`, and whatever carries their messages (HTTP, a simulation) only moves
plain JSON objects and one binary frame between them. After Bonawitz et al. 2017 ("Practical Secure
Aggregation for Privacy-Preserving Machine Learning") with the sparse neighbour graph of Bell et al.
2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", SecAgg+), as Flower runs it.
Needs the `cryptography` package (extra `pocketfed[secagg]`); nothing else in pocketfed imports it.

Phases (n devices, numbered 1..n; each has k neighbours in a public random graph):

0. Setup. The server publishes `SecAggConfig.to_dict()`: round, n, model size d, k, threshold t,
   the graph seed, quantization and DP parameters. Devices and server derive the same graph.
1. Advertise keys. Each device makes two fresh X25519 key pairs and sends both public keys.
2. Share keys. The server gives each device its live neighbours' keys. The device draws a random
   self-mask seed b_i, Shamir-splits b_i and its mask private key s_i (t of k shares recover
   each), and sends each neighbour its two shares encrypted with ChaCha20-Poly1305 under a key
   agreed with that neighbour (the server only relays ciphertexts), plus a hash commitment to b_i.
3. Masked input. The server forwards each device the ciphertexts addressed to it. The device sends
        y_i = [w_i, q((w_i/W) delta_i)] + noise_i + PRG(b_i) + sum_j +-PRG(s_ij)   (mod 2^32)
   where w_i is its capped sample count, q the fixed-point quantizer, noise_i its share of the
   distributed DP noise, and s_ij the seed agreed with neighbour j (+ if i < j, - otherwise), so the
   pairwise masks cancel in the sum.
4. Unmask. For each neighbour that sent y_j the server asks survivors for the share of b_j; for each
   neighbour that dropped after phase 2, the share of s_j. Never both for one device: the server
   asks consistently, a device refuses a request that would reveal both (across the whole round),
   and t > k/2 means no party can collect t shares of each. The server rebuilds every b_i of the
   sum (checked against the commitment) and every dropped s_j (checked against its public key),
   subtracts PRG(b_i) and the dropped devices' pairwise masks, and decodes sum(w_i), the weighted
   sum and so the weighted FedAvg mean.

What the server learns: the sum of the survivors' quantized weighted deltas (plus DP noise), the total
weight, who took part in which phase, and sizes. It cannot learn one device's delta: each y_i is
uniformly random in Z_(2^32)^(d+1) to anyone without b_i and its pairwise seeds, and it can rebuild
b_i only for devices whose s_i stays secret. It also refuses to unmask when the survivors' graph is
split (that would reveal partial sums) or fewer than `min_survivors` remain.

Threat model and limits: the server is honest-but-curious (it follows the protocol; it may be
curious about what it stores). Devices trust it to relay public keys faithfully (no device
signatures yet) and to tell every device the same survivor set (Bonawitz et al.'s consistency-check
round is not implemented): a server that lies about who dropped, or substitutes keys, can learn an
input. Devices colluding with the server reduce the distributed DP noise by their own share.

Parameters (`SecAggConfig.create` derives k, t and the noise; see params.py, graph.py, noise.py):

- dropout_tolerance delta = 1/3: up to floor(delta n) devices may drop in total, at any phases,
  and the survivors' exact sum is recovered; below min_survivors = n - floor(delta n) the round is
  abandoned with a reason (`RoundAbandoned`, `ServerSession.abandoned_message()`).
- k: the smallest even degree for which random dropouts within that tolerance stall the round
  with probability <= 1e-6 (n - 1, the complete graph, for small cohorts); t = floor(k/2) + 1.
- clipping_range c = 8, quantization_levels 2^22, modulus 2^32, max_weight W = 1000 (Flower's
  defaults): sums of up to 1023 devices cannot overflow; the config refuses larger cohorts.
- clip_norm C (device-side L2 clip before masking) and noise_multiplier z: each device adds
  Skellam noise so the sum carries central noise of std ~ z * C; `equivalent_noise_multiplier()`
  is what the accountant charges.

Messages (JSON objects; bytes in base64; "round_id" and the sender's or recipient's "index" in each):
    secagg_config      server -> all      SecAggConfig.to_dict()
    advertise          device -> server   {mask_key, share_key} (over HTTP: may ride on the cohort join)
    neighbour_keys     server -> device   {neighbours: [{index, mask_key, share_key}]}
    shares             device -> server   {seed_commitment, shares: [{to, ciphertext}]}
    forwarded_shares   server -> device   {shares: [{from, ciphertext}]}
    masked_input       device -> server   binary frame (wire.py): JSON header + uint32 LE vector
    unmask_request     server -> device   {survivors: [index], dropped: [index]}
    unmask             device -> server   {seed_shares: [{of, share}], key_shares: [{of, share}]}
    abandoned          server -> all      {reason}
"""

from protocol.secagg.client import ClientSession
from protocol.secagg.local import RoundTrace, run_round
from protocol.secagg.params import SecAggConfig
from protocol.secagg.quantize import Quantizer, flatten, unflatten
from protocol.secagg.server import AggregateResult, ServerSession
from protocol.secagg.wire import RoundAbandoned, SecAggError

__all__ = [
    "AggregateResult",
    "ClientSession",
    "Quantizer",
    "RoundAbandoned",
    "RoundTrace",
    "SecAggConfig",
    "SecAggError",
    "ServerSession",
    "flatten",
    "run_round",
    "unflatten",
]
