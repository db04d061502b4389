#!/usr/bin/env node
// Interop dialer: a js-libp2p 2.x peer (TCP + Noise + Yamux, identify and ping only) dials one
// multiaddr, runs identify once, then pings. Human-readable lines go to stderr; the last line on
// stdout is one JSON object, {"ok": true, ...} or {"ok": false, "step": ..., "error": ...}, and the
// exit status is 0 only when every step succeeded.
//
//   node dial.mjs <multiaddr with /p2p/> [--pings N] [--timeout-ms MS]
//
// --pings N      how many pings (default 10), back to back on the one connection; js-libp2p opens
//                a new /ipfs/ping/1.0.0 stream for each. They run one after another, never at
//                once: the ping spec lets a peer refuse more than 2 concurrent ping streams per
//                peer (py-libp2p resets the third), and js-libp2p allows 1 outbound by default.
// --timeout-ms   bound on each step: dial, identify, each ping, stop (default 10000)
//
// The JSON line: ok, step (where it stopped), peer, security and muxer (negotiated on the
// connection), agent, protocol_version, protocols, listen_addrs (from identify), pings (RTTs in
// ms), pings_ms (wall time from the first ping's start to the last one's answer), connections.
//
// The whole run is also bounded by a watchdog (sum of the step bounds), so it never hangs.

import './node20-shim.mjs' // first: Promise.withResolvers on Node 20
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'

function usage (message) {
  process.stderr.write(`dial.mjs: ${message}\nusage: node dial.mjs <multiaddr> [--pings N] [--timeout-ms MS]\n`)
  process.exit(2)
}

function parseArgs (argv) {
  const opts = { addr: undefined, pings: 10, timeoutMs: 10000 }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (arg === '--pings') opts.pings = Number(argv[++i])
    else if (arg === '--timeout-ms') opts.timeoutMs = Number(argv[++i])
    else if (arg.startsWith('--')) usage(`unknown option ${arg}`)
    else if (opts.addr === undefined) opts.addr = arg
    else usage(`unexpected argument ${arg}`)
  }
  if (opts.addr === undefined) usage('missing multiaddr')
  if (!Number.isInteger(opts.pings) || opts.pings < 0) usage('--pings needs a non-negative integer')
  if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) usage('--timeout-ms needs a positive number')
  return opts
}

const opts = parseArgs(process.argv.slice(2))
const result = { ok: false, step: 'start', addr: opts.addr }
let finished = false

function finish (code) {
  if (finished) return
  finished = true
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(code))
}

function fail (step, err) {
  result.ok = false
  result.step = step
  result.error = `${err?.name ?? 'Error'}: ${err?.message ?? String(err)}`
  process.stderr.write(`dial.mjs: FAILED at ${step}: ${result.error}\n`)
  finish(1)
}

// Last resort: whatever hangs (a step that ignores its signal, node.stop()), the process ends.
const watchdogMs = opts.timeoutMs * (4 + opts.pings)
setTimeout(() => fail(result.step, new Error(`watchdog: no result after ${watchdogMs} ms`)), watchdogMs).unref()

const step = (name) => { result.step = name; return AbortSignal.timeout(opts.timeoutMs) }

async function main () {
  let ma
  try {
    ma = multiaddr(opts.addr)
  } catch (err) {
    return fail('parse', err)
  }

  let node
  try {
    step('create')
    node = await createLibp2p({
      addresses: { listen: [] }, // dial only
      transports: [tcp()],
      connectionEncrypters: [noise()],
      streamMuxers: [yamux()],
      services: {
        // identify is run explicitly below, on the connection, so its result can be checked
        identify: identify({ runOnConnectionOpen: false, timeout: opts.timeoutMs }),
        ping: ping({ timeout: opts.timeoutMs })
      }
    })
  } catch (err) {
    return fail('create', err)
  }

  try {
    let connection
    try {
      connection = await node.dial(ma, { signal: step('dial') })
    } catch (err) {
      return fail('dial', err)
    }
    result.peer = connection.remotePeer.toString()
    result.security = connection.encryption
    result.muxer = connection.multiplexer
    process.stderr.write(`connected to ${result.peer} security=${result.security} muxer=${result.muxer}\n`)

    let id
    try {
      id = await node.services.identify.identify(connection, { signal: step('identify') })
    } catch (err) {
      return fail('identify', err)
    }
    result.agent = id.agentVersion ?? null
    result.protocol_version = id.protocolVersion ?? null
    result.protocols = [...id.protocols].sort()
    result.listen_addrs = id.listenAddrs.map((a) => a.toString())
    process.stderr.write(`identify: agent=${result.agent} protocolVersion=${result.protocol_version}\n`)
    process.stderr.write(`identify: protocols=${result.protocols.join(' ')}\n`)

    const peer = connection.remotePeer // pings reuse the connection above
    result.pings = []
    const started = performance.now()
    for (let i = 0; i < opts.pings; i++) {
      try {
        result.pings.push(await node.services.ping.ping(peer, { signal: step('ping') }))
      } catch (err) {
        return fail('ping', new Error(`ping ${i + 1}/${opts.pings}: ${err?.message ?? err}`))
      }
      process.stderr.write(`ping ${i + 1}/${opts.pings}: ${result.pings.at(-1)} ms\n`)
    }
    result.pings_ms = Math.round((performance.now() - started) * 10) / 10
    process.stderr.write(`${opts.pings} pings in ${result.pings_ms} ms\n`)

    // still the one connection: nothing above had to redial
    result.connections = node.getConnections(peer).length
  } finally {
    try {
      result.step = 'stop'
      await Promise.race([
        node.stop(),
        new Promise((resolve, reject) => setTimeout(() => reject(new Error(`stop took over ${opts.timeoutMs} ms`)), opts.timeoutMs).unref())
      ])
    } catch (err) {
      process.stderr.write(`dial.mjs: warning: ${err.message}\n`) // not a failure of the interop check
    }
  }

  if (finished) return
  result.ok = true
  result.step = 'done'
  finish(0)
}

main().catch((err) => fail(result.step, err))
