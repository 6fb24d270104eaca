// Two stock bittorrent-tracker WebSocket clients (the client P2P Media Loader uses) against a
// peerd node's viewer swarm tracker, for tests/test_swarm.py. WebRTC in Node is @roamhq/wrtc.
//
//   node tracker.mjs pair <announce url A> <announce url B> <info hash hex>
//
// Both clients announce the same info hash; the tracker relays A's and B's offers and answers;
// the test passes when a WebRTC data channel opens between them and a message crosses it each
// way. Then A scrapes. The last stdout line is a JSON result.
import Client from 'bittorrent-tracker'
import wrtc from '@roamhq/wrtc'
import { randomBytes } from 'node:crypto'

const [mode, urlA, urlB, infoHashHex] = process.argv.slice(2)
if (mode !== 'pair') throw new Error(`unknown mode ${mode}`)

const infoHash = Buffer.from(infoHashHex, 'hex')
const warnings = []
const got = {}

function client (name, url) {
  // 20 random bytes: on the wire a "binary string" with code points up to 255
  const c = new Client({ infoHash, peerId: randomBytes(20), announce: [url], port: 6881, wrtc })
  c.on('warning', err => warnings.push(`${name}: ${err.message}`))
  c.on('error', err => warnings.push(`${name} error: ${err.message}`))
  c.on('peer', peer => {
    peer.on('connect', () => peer.send(`hello from ${name}`))
    peer.on('data', data => { got[name] = Buffer.from(data).toString() })
    peer.on('error', err => warnings.push(`${name} peer: ${err.message}`))
  })
  return c
}

const a = client('A', urlA)
const b = client('B', urlB)
const updates = []
a.on('update', u => updates.push({ complete: u.complete, incomplete: u.incomplete }))
a.start()
b.start()

const deadline = Date.now() + 60000
// B's first announce finds A already in the swarm: its offers reach A, A answers. A announces
// again (update) so that its offers reach B as well, until both sides have a channel.
const again = setInterval(() => a.update(), 3000)
while (!(got.A && got.B) && Date.now() < deadline) {
  await new Promise(resolve => setTimeout(resolve, 100))
}
clearInterval(again)

const scrape = await new Promise(resolve => {
  a.once('scrape', data => resolve({ complete: data.complete, incomplete: data.incomplete }))
  a.scrape()
  setTimeout(() => resolve(null), 10000)
})

a.destroy()
b.destroy()
console.log(JSON.stringify({ received: got, scrape, updates, warnings }))
process.exit(0)
