"""Test support shipped with the package: real-daemon process control, fakes of the services
that cannot run here (coordinator, Cloudflare TURN and Access), media and browser helpers."""
