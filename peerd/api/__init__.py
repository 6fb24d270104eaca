"""The coordinator-facing API (``/api/v1/``): what the coordinator asks of a node.

The contract in one page (the OpenAPI document ``peerd/api/openapi.json`` is its exact form):

* ``GET /api/v1/node`` — peer id, version, public URL, LAN and libp2p addresses, capabilities.
* ``GET /api/v1/health`` — status, active streams, egress, spare uplink, disk, quota, jobs.
* ``GET /api/v1/inventory?since=S&limit=N`` — blob and media changes after cursor ``S`` with the
  inventory digest (:mod:`peerd.core.inventory`).
* ``POST /api/v1/challenge`` — ``{nonce, cid, offset, length}`` -> ``sha256(nonce || bytes)``,
  the response body signed by the node key; unknown blob -> 404.
* ``POST /api/v1/commands/{prefetch,pin,unpin,evict,promote}`` -> 202 with a job;
  ``GET /api/v1/jobs/{id}`` polls it (:mod:`peerd.api.commands`, :mod:`peerd.api.jobs`).
* ``GET /api/v1/openapi.json`` — the document, without authentication.

Authentication is a bearer token (``api_token`` secret) and optionally a Cloudflare Access JWT
(:mod:`peerd.api.routes`). Errors are ``{"error": code, "message": text}`` with the status of
the :mod:`peerd.errors` class. The other direction, node -> coordinator, lives in
:mod:`peerd.coordinator`.
"""
