// A real EventSource client (the npm `eventsource` package, WHATWG-compatible) against a
// server's /events: prints one JSON line per event received, and one per (re)connection, until
// it has received COUNT messages; then exits 0. Used by the servers' tests.
//
//   node eventsource.mjs URL COUNT
import { EventSource } from 'eventsource'

const [url, count] = [process.argv[2], Number(process.argv[3])]
let received = 0
const es = new EventSource(url, {
  // Wraps fetch only to report each request's Last-Event-ID, which the test checks.
  fetch: (input, init) => {
    const last = init?.headers?.['Last-Event-ID'] ?? null
    console.log(JSON.stringify({ connect: true, lastEventId: last }))
    return fetch(input, init)
  },
})
es.addEventListener('open', () => console.log(JSON.stringify({ open: true })))
es.addEventListener('error', () => console.log(JSON.stringify({ error: true })))
es.addEventListener('message', (e) => {
  console.log(JSON.stringify({ id: e.lastEventId, data: JSON.parse(e.data) }))
  received += 1
  if (received >= count) {
    es.close()
    process.exit(0)
  }
})
setTimeout(() => {
  console.error(`eventsource: ${received} of ${count} messages after 30 s`)
  process.exit(1)
}, 30_000)
