"""Media packaging: probe, remux or transcode any input into deterministic, content-addressed HLS.

`probe` reads what a file holds, `package` turns it into blobs and a `Manifest` (blocking PyAV
work), `ingest.Ingestor` runs that in a worker thread, stores the blobs and catalog rows, and
produces on-demand rendition segments. See `peerd.media.package` for the theory of operation.
"""
