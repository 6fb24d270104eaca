"""Node -> coordinator: registration, heartbeats and the drain notice, signed by the node key.

Protocol
--------
The coordinator is reached at ``coordinator.url`` (a Cloudflare Worker). The node POSTs a
``NodeReport`` (``peerd.api.models``; ``webhooks`` in the OpenAPI document) to:

``<url>/v1/nodes/register``
    at start, and whenever the coordinator answers a heartbeat with 404 or ``reregister: true``;
``<url>/v1/nodes/heartbeat``
    every ``coordinator.heartbeat_interval_s`` (the coordinator may change it by answering
    ``heartbeat_interval_s``);
``<url>/v1/nodes/drain``
    once on stop, with ``draining: true`` and ``drain_deadline_s``; the coordinator stops routing
    viewers to the node and, if it wants, redirects them elsewhere before the deadline.

The report carries peer id, name, version, public URL, LAN and libp2p addresses, capabilities,
capacity (disk, store, quota, uplink and spare uplink), load (active streams, egress), the
inventory summary (digest, count, change sequence), ``timestamp`` and ``nonce``. It is signed as
described in :mod:`peerd.core.signed`: ed25519 over the exact body bytes, in
``X-Peerd-Signature``, with ``X-Peerd-Peer-Id`` naming the signer (the coordinator derives the
public key from the peer id). The coordinator refuses (401) a bad signature, a timestamp more
than 60 s off its clock, or a nonce it has seen in that window.

Failure handling: 2xx is success; 404 means "register again"; network errors, 429 and 5xx back
off exponentially with jitter (``coordinator.backoff_initial_s`` .. ``backoff_max_s``); other 4xx
(a refused signature, e.g. a skewed clock) back off the same way and are logged as errors. The
client runs in its own task and never holds anything the serving path waits for: the node keeps
serving with the coordinator down, and catches up (registers, reports) when it returns.

Drain (:meth:`CoordinatorService.drain`, on SIGTERM) within ``coordinator.drain_budget_s``:
send the drain notice (at most ``drain_notice_timeout_s``), wait for in-flight streams to end (at
most ``drain_streams_s``; the HTTP layer already refuses new ones since ``rt.draining`` is set),
then upload to R2 every blob whose only copy is here (``replicator.upload_last_copies``) with the
time left.
"""
