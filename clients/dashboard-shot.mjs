// A screenshot of a server's /dashboard (docs/dashboard.md). Once the page is live it runs
// COMMAND (a load generator, say), and takes the screenshot SECONDS later, then waits for
// COMMAND to finish.
//
//   node dashboard-shot.mjs URL OUT.png [--after SECONDS] [--width PX] [-- COMMAND ARGS...]
import { spawn } from 'node:child_process'
import { launch } from './browser.mjs'

const argv = process.argv.slice(2)
const dash = argv.indexOf('--')
const command = dash < 0 ? [] : argv.slice(dash + 1)
const own = dash < 0 ? argv : argv.slice(0, dash)
const option = (name, fallback) => {
  const i = own.indexOf(name)
  return i < 0 ? fallback : Number(own.splice(i, 2)[1])
}
const seconds = option('--after', 10)
const width = option('--width', 1400)
const [url, out] = own
if (!url || !out || !(seconds >= 0) || !(width > 0)) {
  console.error('usage: node dashboard-shot.mjs URL OUT.png [--after SECONDS] [--width PX] [-- COMMAND ARGS...]')
  process.exit(2)
}

const { context, close } = await launch({ width, height: 900 })
const page = await context.newPage()
page.on('pageerror', (e) => console.error(`page error: ${e.message}`))
page.on('console', (m) => m.type() === 'error' && console.error(`console: ${m.text()}`))
await page.goto(url)
await page.waitForFunction(() => document.getElementById('status')?.dataset.state === 'live')
const load = command.length ? spawn(command[0], command.slice(1), { stdio: 'inherit' }) : null
const finished = load && new Promise((resolve) => load.on('exit', resolve))
await page.waitForTimeout(seconds * 1000)
await page.screenshot({ path: out, fullPage: true })
await close()
console.error(`dashboard-shot: ${out}`)
process.exit(load ? await finished : 0)
