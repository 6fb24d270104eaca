// js-libp2p (the reference implementation) against a peerd node, for tests/test_libp2p_js_interop.py.
//
// Modes (one JSON object per line on stdout; the last line is the result):
//   dial <multiaddr> <cid>   dial peerd over TCP + Noise + yamux, identify, ping twice, fetch <cid>
//                            over /peerd/blob/1.0.0 and hash it, find <cid>'s providers (Kad-DHT client).
//   plaintext <multiaddr>    the same dial offering only /plaintext/2.0.0: must fail (peerd is Noise-only).
//   serve <blob file>        listen on loopback with Kad-DHT (server mode, /ipfs/kad/1.0.0), serve the
//                            file over /peerd/blob/1.0.0, provide its CID; print {"listening": ...}, then
//                            run until stdin closes and print what peerd did (connections, requests).
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { ping } from '@libp2p/ping'
import { plaintext } from '@libp2p/plaintext'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'

// js-libp2p 2.x's transitive it-queue calls Promise.withResolvers (ES2024, Node >= 22); this is
// the whole of what Node 20 lacks for it, so define it here rather than require a newer Node.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const BLOB = '/peerd/blob/1.0.0'

// CIDv1, raw codec, sha2-256 multihash, multibase base32 lower ("b..."): peerd's blob id.
function cidOf (data) {
  const bytes = Buffer.concat([Buffer.from([0x01, 0x55, 0x12, 0x20]), createHash('sha256').update(data).digest()])
  const alphabet = 'abcdefghijklmnopqrstuvwxyz234567'
  let bits = 0
  let value = 0
  let out = 'b'
  for (const byte of bytes) {
    value = (value << 8) | byte
    bits += 8
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31]
      bits -= 5
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31]
  return out
}
const TIMEOUT_MS = 60_000

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function signal () {
  return AbortSignal.timeout(TIMEOUT_MS)
}

async function makeNode (opts) {
  return createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [opts.plaintext ? plaintext() : noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      ...(opts.dht
        ? { dht: kadDHT({ clientMode: opts.dht === 'client', peerInfoMapper: passthroughMapper }) }
        : {})
    }
  })
}

async function readAll (source) {
  const parts = []
  for await (const chunk of source) parts.push(chunk.subarray())
  return Buffer.concat(parts)
}

async function dial (addr, cid) {
  const ma = multiaddr(addr)
  const expected = ma.getPeerId()
  const node = await makeNode({ dht: 'client' })
  const out = { mode: 'dial', expected_peer: expected }
  try {
    const conn = await node.dial(ma, { signal: signal() })
    out.connected = true
    out.remote_peer = conn.remotePeer.toString()
    out.encryption = conn.encryption
    out.multiplexer = conn.multiplexer
    const id = await node.services.identify.identify(conn, { signal: signal() })
    out.protocols = [...id.protocols].sort()
    out.agent = id.agentVersion ?? null
    out.identify_peer = id.peerId.toString()
    out.ping_ms = []
    for (let i = 0; i < 2; i++) out.ping_ms.push(await node.services.ping.ping(ma, { signal: signal() }))
    const stream = await node.dialProtocol(ma, BLOB, { signal: signal() })
    out.stream_protocol = stream.protocol
    await stream.sink([new TextEncoder().encode(cid + '\n')])
    const body = await readAll(stream.source)
    out.blob_status = body[0]
    const size = body.readBigUInt64BE(1)
    const data = body.subarray(9)
    out.blob_size = Number(size)
    out.blob_size_ok = BigInt(data.length) === size
    out.blob_sha256 = createHash('sha256').update(data).digest('hex')
    out.cid_ok = cidOf(data) === cid
    // A CID peerd does not hold: status NOT_HELD (1), size 0, no body.
    const miss = cidOf(Buffer.from('no such blob'))
    const s2 = await node.dialProtocol(ma, BLOB, { signal: signal() })
    await s2.sink([new TextEncoder().encode(miss + '\n')])
    const b2 = await readAll(s2.source)
    out.miss_status = b2[0]
    out.miss_length = b2.length
    // Kad-DHT: GET_PROVIDERS for the blob, answered by peerd's DHT (it provides what it holds).
    out.providers = []
    for await (const p of node.contentRouting.findProviders(CID.parse(cid), { signal: signal() })) {
      out.providers.push({ id: p.id.toString(), addrs: p.multiaddrs.map(String) })
      if (p.id.toString() === expected) break
    }
  } finally {
    await node.stop()
  }
  return out
}

async function dialPlaintext (addr) {
  const ma = multiaddr(addr)
  const node = await makeNode({ plaintext: true })
  const out = { mode: 'plaintext' }
  try {
    await node.dial(ma, { signal: signal() })
    out.connected = true
  } catch (err) {
    out.connected = false
    out.error = String(err?.name ?? err)
  } finally {
    await node.stop()
  }
  return out
}

async function serve (file) {
  const data = readFileSync(file)
  const cid = cidOf(data)
  const node = await makeNode({ dht: 'server' })
  const seen = { inbound_peers: [], requests: [], encryption: [], multiplexer: [] }
  node.addEventListener('connection:open', (evt) => {
    const c = evt.detail
    seen.inbound_peers.push(c.remotePeer.toString())
    seen.encryption.push(c.encryption)
    seen.multiplexer.push(c.multiplexer)
  })
  await node.handle(BLOB, async ({ stream, connection }) => {
    // The request is one line; read until the newline, then answer with header + bytes.
    let line = Buffer.alloc(0)
    for await (const chunk of stream.source) {
      line = Buffer.concat([line, chunk.subarray()])
      if (line.includes(10) || line.length > 128) break
    }
    const want = line.subarray(0, line.indexOf(10)).toString('ascii')
    seen.requests.push({ peer: connection.remotePeer.toString(), cid: want })
    const header = Buffer.alloc(9)
    if (want === cid) {
      header.writeBigUInt64BE(BigInt(data.length), 1)
      await stream.sink([header, data])
    } else {
      header[0] = 1
      await stream.sink([header])
    }
  })
  emit({ listening: node.getMultiaddrs().map(String), peer: node.peerId.toString(), cid: cid })
  // Provide once peerd (a DHT server) is in the routing table; the local provider record is
  // what answers peerd's GET_PROVIDERS either way.
  const provided = (async () => {
    try {
      await node.contentRouting.provide(CID.parse(cid), { signal: signal() })
      return true
    } catch (err) {
      return String(err?.name ?? err)
    }
  })()
  await new Promise((resolve) => {
    process.stdin.on('end', resolve)
    process.stdin.on('close', resolve)
    process.stdin.resume()
  })
  seen.provided = await Promise.race([provided, new Promise((resolve) => setTimeout(() => resolve('pending'), 10))])
  await node.stop()
  return { mode: 'serve', ...seen }
}

const [mode, ...args] = process.argv.slice(2)
try {
  if (mode === 'dial') emit(await dial(args[0], args[1]))
  else if (mode === 'plaintext') emit(await dialPlaintext(args[0]))
  else if (mode === 'serve') emit(await serve(args[0]))
  else throw new Error(`unknown mode ${mode}`)
  process.exit(0)
} catch (err) {
  emit({ mode, fatal: String(err?.stack ?? err) })
  process.exit(1)
}
