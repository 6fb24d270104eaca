"""Pure core: ids, manifests, playlists, policies and state machines.

Nothing in this package performs I/O or imports asyncio, aiohttp, boto3, av or aiosqlite. Functions
take the current time as an argument when they need it and return values, actions or events as
frozen dataclasses; the subsystems around them do the I/O.
"""
