"""The HTTP server: HLS for viewers, the coordinator API, WHEP, health and metrics.

One aiohttp application on the stock asyncio loop (``loop.sendfile`` for blobs). Subsystems add
their routes through installers registered in ``peerd.daemon.route_installers``; errors are
``PeerdError``s turned into JSON responses by one middleware. Plain playlist and held-blob
requests are answered by :mod:`peerd.http.fastpath` (``[http] fast_path``) before aiohttp's
request machinery, through the questions it may ask the HLS routes (:class:`fastpath.Hls`).
"""
