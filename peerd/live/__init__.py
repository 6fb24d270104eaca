"""Live streaming: inputs published over RTMP/RTMPS or WHIP, played as low-latency HLS and WHEP.

The contract every part shares is :mod:`peerd.core.live`: ingest adapters turn what a publisher
sends into :class:`~peerd.core.live.LiveTrack` and :class:`~peerd.core.live.LiveFrame` and hand
them to the :class:`~peerd.core.live.LiveSink` the live service gives each accepted publisher;
the service fans a publication out to its consumers (the LL-HLS packager, WHEP viewers, the
recorder).

Modules: ``service`` (inputs, keys, one publisher per input, the publication's fan-out, status),
``record`` (a publication recorded, then ingested as a media item), ``rtmp`` (RTMP/RTMPS ingest),
``llhls`` (the low-latency HLS packager and its routes; ``fmp4`` writes its boxes), ``whip``
(WHIP ingest), ``whep`` (WHEP viewers of a live input).
"""
