"""The HTTP server: HLS for viewers, the coordinator API, WHEP, health and metrics.

One aiohttp application on the stock asyncio loop (``loop.sendfile`` for blobs). Subsystems add
their routes through installers registered in ``peerd.daemon.route_installers``; errors are
``PeerdError``s turned into JSON responses by one middleware. With ``http.workers > 1`` the HLS
hot path also runs in worker processes on the same port (:mod:`peerd.http.worker`, started and
merged by :mod:`peerd.http.workers`).
"""
