"""WebRTC playback (WHEP) of stored renditions, with aiortc.

Cloudflare Tunnel carries only HTTP to the node, so WHEP signalling (an SDP offer posted to
``/whep/<media id>``, answered with an SDP answer) goes through the tunnel, and media goes
directly between viewer and node over UDP, or through Cloudflare TURN when no direct path
exists. The node's ICE servers come from ``peerd.webrtc.ice`` (static, or credentials minted by
Cloudflare's generate-ice-servers API); the same list is used by the node's peer connection and
handed to the viewer in ``Link: <...>; rel="ice-server"`` headers.

::

    viewer                         node (peerd)
      | POST /whep/<id>  offer ------> routes -> WhepService.open
      |                                 plan codec (core.whep.choose_video)
      |                                 RTCPeerConnection + PacedTracks + Feeder
      | <---- 201 answer, Location, Link (ICE servers)
      | ==== ICE / DTLS / SRTP (UDP, direct or TURN) ====
      |        H.264 packets as stored (passthrough) or re-encoded; AAC -> Opus
      | DELETE /whep/sessions/<sid> --> WhepService.close

Modules: ``routes`` (HTTP), ``session`` (sessions, cap, cleanup), ``media`` (segments -> paced
tracks), ``ice`` (ICE servers); who may watch is decided by ``peerd.http.access`` (as for HLS);
policy without I/O in ``peerd.core.whep``.
"""
