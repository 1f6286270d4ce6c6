// Sends one person's calls to a whenthen server with the official @segment/analytics-node,
// unchanged, pointed at the server with its `host` option (it posts to `${host}/v1/batch`).
//
// Usage: node send.mjs <host> <writeKey> <userId> <anonymousId> <previousId>
// (or WHENTHEN_HOST, WHENTHEN_WRITE_KEY, WHENTHEN_USER_ID, WHENTHEN_ANONYMOUS_ID,
// WHENTHEN_PREVIOUS_ID). Run by tests/e2e/test_segment_sdks.py.
//
// On success prints {"library": ..., "events": [...]} (the events as the library sent
// them) on stdout and exits 0. Exits 1 on any error event, failed delivery or non-2xx
// response, 2 on bad usage.
import { Analytics } from '@segment/analytics-node'

const [host, writeKey, userId, anonymousId, previousId] = [
  process.argv[2] ?? process.env.WHENTHEN_HOST,
  process.argv[3] ?? process.env.WHENTHEN_WRITE_KEY,
  process.argv[4] ?? process.env.WHENTHEN_USER_ID,
  process.argv[5] ?? process.env.WHENTHEN_ANONYMOUS_ID,
  process.argv[6] ?? process.env.WHENTHEN_PREVIOUS_ID,
]
if (!host || !writeKey || !userId || !anonymousId || !previousId) {
  console.error('usage: node send.mjs <host> <writeKey> <userId> <anonymousId> <previousId>')
  process.exit(2)
}

const problems = []
const delivered = []

const analytics = new Analytics({
  writeKey,
  host,
  maxRetries: 2,
  httpRequestTimeout: 10000,
})

analytics.on('error', (err) => {
  problems.push(`error event: ${err.code}: ${err.reason?.message ?? String(err.reason)}`)
})
analytics.on('http_response', (res) => {
  if (res.status < 200 || res.status >= 300) {
    problems.push(`HTTP ${res.status} ${res.statusText} from ${res.url}`)
  }
})
analytics.on('http_request', (req) => {
  if (!req.url.endsWith('/v1/batch')) {
    problems.push(`unexpected request URL ${req.url}`)
  }
})

const callback = (err, ctx) => {
  if (err) {
    problems.push(`delivery failed: ${err.message ?? String(err)}`)
  } else {
    delivered.push(ctx.event)
  }
}

const context = { ip: '198.51.100.23', timezone: 'America/New_York', app: { name: 'node-shop' } }

// Anonymous first.
analytics.track(
  {
    anonymousId,
    event: 'Product Viewed',
    properties: { sku: 'N-1', price: 12.5, tags: ['x', 'y'] },
    context,
  },
  callback,
)
analytics.page(
  { anonymousId, category: 'Shop', name: 'Checkout', properties: { path: '/checkout', step: 2 }, context },
  callback,
)
// Then known: both ids, so the anonymous activity joins the person.
analytics.identify(
  {
    userId,
    anonymousId,
    traits: { email: '  Node.User@Example.ORG ', name: 'Node User', plan: 'team' },
    context,
  },
  callback,
)
analytics.track(
  {
    userId,
    event: 'Order Completed',
    properties: { order_id: 'o-77', revenue: 99.95, currency: 'USD', items: [{ sku: 'N-1', qty: 2 }] },
    context,
  },
  callback,
)
analytics.group({ userId, groupId: 'globex', traits: { name: 'Globex', employees: 1200 }, context }, callback)
analytics.alias({ userId, previousId, context }, callback)

try {
  await analytics.closeAndFlush({ timeout: 30000 })
} catch (err) {
  problems.push(`closeAndFlush failed: ${err?.message ?? String(err)}`)
}

if (delivered.length !== 6) {
  problems.push(`expected 6 delivered calls, got ${delivered.length}`)
}
if (problems.length > 0) {
  for (const p of problems) console.error(p)
  process.exit(1)
}
process.stdout.write(JSON.stringify({ library: analytics.VERSION, events: delivered }) + '\n')
