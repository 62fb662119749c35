// A screenshot of a server's /dashboard after watching it for a while (docs/dashboard.md).
//
//   node dashboard-shot.mjs URL OUT.png [SECONDS] [WIDTH]
import { launch } from './browser.mjs'

const [url, out, seconds = '10', width = '1400'] = process.argv.slice(2)
if (!url || !out) {
  console.error('usage: node dashboard-shot.mjs URL OUT.png [SECONDS] [WIDTH]')
  process.exit(2)
}
const { context, close } = await launch({ width: Number(width), height: 900 })
const page = await context.newPage()
page.on('pageerror', (e) => console.error(`page error: ${e.message}`))
page.on('console', (m) => m.type() === 'error' && console.error(`console: ${m.text()}`))
await page.goto(url)
await page.waitForTimeout(Number(seconds) * 1000)
await page.screenshot({ path: out, fullPage: true })
await close()
console.log(out)
