// Drives a server's /dashboard in headless Chromium, for the servers' tests
// (crates/dashboard-test): two pages watch one server. It makes requests and waits for the
// page's numbers and chart to move; posts a note in one page and times its arrival in the
// other; takes a screenshot; then asks the test to stop the server and start it again on the
// same port and journal, and waits for the pages to say "reconnecting", then to come back with
// the new process. Every console error and uncaught exception of both pages is reported.
//
//   node dashboard.mjs URL SCREENSHOT.png
//
// stdout: one JSON line per step; {"ask":"stop"} and {"ask":"start"} are requests to the test,
// which answers on stdin with `stopped` and `started PID`. The last line is {"report": {...}},
// or {"failed": "why", ...} (exit 1).
import { createInterface } from 'node:readline'
import { launch } from './browser.mjs'

const [url, screenshot] = process.argv.slice(2)
const origin = new URL(url).origin
const say = (v) => console.log(JSON.stringify(v))

// Lines from the test, in order.
const input = createInterface({ input: process.stdin })
const pending = []
const waiters = []
input.on('line', (l) => (waiters.length ? waiters.shift()(l) : pending.push(l)))
const nextLine = () => new Promise((resolve) => (pending.length ? resolve(pending.shift()) : waiters.push(resolve)))

// Console errors and uncaught exceptions, with the phase they happened in.
let phase = 'up'
let step = 'loading the pages'
const errors = []
function watch(page, name) {
  page.on('console', (m) => m.type() === 'error' && errors.push({ page: name, phase, text: m.text() }))
  page.on('pageerror', (e) => errors.push({ page: name, phase, text: `uncaught: ${e.message}` }))
}

// In the page: shown(el) is a number as the dashboard shows it (`1,234`; NaN for `–`).
// When a form was last submitted, and when each note's text first appeared in the list.
const HOOKS = () => {
  window.shown = (el) => Number(el.textContent.replace(/,/g, ''))
  window.appeared = {}
  document.addEventListener('submit', () => { window.submitted = Date.now() }, true)
  new MutationObserver((changes) => {
    for (const c of changes) for (const n of c.addedNodes) {
      if (n.tagName === 'LI' && n.lastChild) window.appeared[n.lastChild.textContent] ??= Date.now()
    }
  }).observe(document, { childList: true, subtree: true })
}

const { context, close } = await launch()
const [a, b] = [await context.newPage(), await context.newPage()]
const watchdog = setTimeout(() => fail('no result after 60 s'), 60_000)
try {
  watch(a, 'a')
  watch(b, 'b')
  for (const page of [a, b]) {
    await page.addInitScript(HOOKS)
    await page.goto(`${origin}/dashboard?interval=250ms`)
  }
  const live = (page, pid) => page.waitForFunction((pid) => {
    const status = document.getElementById('status').dataset.state
    const chat = document.getElementById('chat-status').textContent
    return status === 'live' && chat === 'live' && (pid === null || document.getElementById('pid').textContent === pid)
  }, pid, { timeout: 15_000 })
  await live(a, null)
  await live(b, null)
  say({ step: 'live' })
  step = 'under load, waiting for the numbers to move'

  // ---- load: the numbers move --------------------------------------------------------------
  const read = (page) => page.evaluate(() => ({
    pattern: document.getElementById('pattern').textContent,
    pid: document.getElementById('pid').textContent,
    worker_pids: document.getElementById('worker-pids').textContent,
    uptime: document.getElementById('uptime').textContent,
    requests: shown(document.getElementById('t-requests')),
    rps: shown(document.getElementById('t-rps')),
    open: shown(document.getElementById('t-open')),
    held: shown(document.getElementById('t-held')),
    workers: [...document.querySelectorAll('#workers tr')].map((tr) => ({
      id: tr.dataset.worker,
      pid: tr.children[1].textContent,
      open: shown(tr.querySelector('.open')),
      rps: shown(tr.querySelector('.rps')),
      held: shown(tr.querySelector('.held')),
    })),
    samples: Number(document.getElementById('chart-rps').dataset.samples),
  }))
  const idle = await read(a)
  const arrived = (page, text, selector = '#chat-list li') => page.waitForFunction(([text, selector]) =>
    [...document.querySelectorAll(selector)].some((li) => li.textContent.includes(text)),
  [text, selector], { timeout: 10_000 })
  const note = `hello from page a, ${Date.now()}`
  let chatMs
  await withLoad(async () => {
    await a.waitForFunction((before) => {
      const rps = [...document.querySelectorAll('#workers .rps')].map(shown)
      return shown(document.getElementById('t-requests')) >= before + 300 && rps.some((v) => v > 0)
    }, idle.requests, { timeout: 15_000 })
    const duringLoad = await read(a)
    const chartPixels = await a.evaluate(colouredPixels, 'chart-rps')
    say({ step: 'load', idle, duringLoad, chartPixels })

    // ---- the notes, still under load: one page posts, the other sees it --------------------
    step = 'a note from page a to page b'
    await a.fill('#chat-input', note)
    const clicked = Date.now()
    await a.click('#chat-send')
    await arrived(b, note)
    const chatWallMs = Date.now() - clicked
    // From the form's submit in one page to the note's element in the other (one machine, one
    // clock): the page's own path, without the driver's polling.
    chatMs = (await b.evaluate((text) => window.appeared[text], note)) - (await a.evaluate(() => window.submitted))
    await arrived(a, note, '#chat-list li.mine')
    say({ step: 'chat', chatMs, chatWallMs })
    await a.screenshot({ path: screenshot, fullPage: true })
  })

  // ---- the server restarts -----------------------------------------------------------------
  phase = 'down'
  step = 'server stopped, waiting for "reconnecting"'
  say({ ask: 'stop' })
  await nextLine()
  for (const page of [a, b]) {
    await page.waitForFunction(() => document.getElementById('status').dataset.state === 'reconnecting',
      null, { timeout: 10_000 })
  }
  const down = await read(a)
  say({ ask: 'start' })
  step = 'server started again, waiting for the pages to show it'
  const pid = (await nextLine()).split(' ')[1]
  await live(a, pid)
  await live(b, pid)
  phase = 'up'
  step = 'after the restart, under load'
  // The charts go on with the new process's samples; its requests are counted from zero.
  const before = await read(a)
  const afterRestart = await withLoad(async () => {
    await a.waitForFunction((samples) =>
      Number(document.getElementById('chart-rps').dataset.samples) >= samples + 3 &&
      [...document.querySelectorAll('#workers .rps')].map(shown).some((v) => v > 0),
    before.samples, { timeout: 15_000 })
    return read(a)
  })
  // The notes reconnected (Last-Event-ID): a new one arrives, the old one is shown once.
  const again = `hello again from page b, ${Date.now()}`
  await b.fill('#chat-input', again)
  await b.click('#chat-send')
  await arrived(a, again)
  const firstNoteShown = await b.evaluate((text) =>
    [...document.querySelectorAll('#chat-list li')].filter((li) => li.textContent.includes(text)).length, note)
  say({
    report: { pattern: idle.pattern, idle, chatMs, down, afterRestart, pid, firstNoteShown, errors },
  })
  clearTimeout(watchdog)
  await close()
  input.close()
} catch (e) {
  await fail(e.message)
}

// Runs `f` while four loops make GET / requests (each over a kept-alive connection).
async function withLoad(f) {
  let stop = false
  const loop = async () => {
    while (!stop) await (await fetch(`${origin}/`)).arrayBuffer()
  }
  const loops = [loop(), loop(), loop(), loop()]
  try {
    return await f()
  } finally {
    stop = true
    await Promise.allSettled(loops)
  }
}

// In the page: how many pixels of a canvas are coloured (the workers' lines; the grid and the
// labels are grey).
function colouredPixels(id) {
  const c = document.getElementById(id)
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data
  let n = 0
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 128 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++
  }
  return n
}

async function fail(why) {
  say({ failed: `${step}: ${why}`, phase, errors })
  await a.screenshot({ path: screenshot.replace(/\.png$/, '') + '-failed.png', fullPage: true }).catch(() => {})
  await close().catch(() => {})
  process.exit(1)
}
