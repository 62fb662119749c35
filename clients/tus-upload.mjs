// A real tus client (the npm `tus-js-client` package) uploads one file to a server's tus
// endpoint, reading it as node programs do (fs.createReadStream), and prints one JSON line of
// what happened: the upload URL, the bytes sent, each retry and the error behind it, and every
// request with its status. Exits 0 once the upload succeeded, 1 if it failed. Used by the
// servers' tests.
//
//   node tus-upload.mjs ENDPOINT FILE [--chunk-size N] [--parallel N] [--retry-delays 0,100,..]
//                       [--override-patch true]
//
// --chunk-size: bytes per PATCH (default: the whole file in one PATCH); --parallel: that many
// partial uploads at once, then a final one that concatenates them (the concatenation
// extension); --retry-delays: ms to wait before each retry (default: the client's own);
// --override-patch true: each PATCH is sent as a POST with `X-HTTP-Method-Override: PATCH`.
import { createReadStream } from 'node:fs'
import { Upload, defaultOptions } from 'tus-js-client'

const usage =
  'usage: node tus-upload.mjs ENDPOINT FILE [--chunk-size N] [--parallel N] [--retry-delays MS,MS,..] [--override-patch true]'
const [endpoint, file, ...flags] = process.argv.slice(2)
if (!endpoint || !file) {
  console.error(usage)
  process.exit(2)
}
const options = {}
for (let i = 0; i < flags.length; i += 2) {
  const [flag, value] = [flags[i], flags[i + 1]]
  if (value === undefined) {
    console.error(`${flag} needs a value\n${usage}`)
    process.exit(2)
  }
  if (flag === '--chunk-size') options.chunkSize = Number(value)
  else if (flag === '--parallel') options.parallelUploads = Number(value)
  else if (flag === '--retry-delays') options.retryDelays = value.split(',').map(Number)
  else if (flag === '--override-patch') options.overridePatchMethod = value === 'true'
  else {
    console.error(`unknown flag ${flag}\n${usage}`)
    process.exit(2)
  }
}

const requests = []
const errors = []
let retries = 0
let bytes = 0
const report = (fields) => {
  console.log(JSON.stringify({ ...fields, bytes, retries, errors, requests }))
}

const upload = new Upload(createReadStream(file), {
  endpoint,
  ...options,
  metadata: { filename: file.split('/').pop() },
  onProgress: (sent) => {
    bytes = sent
  },
  onAfterResponse: (req, res) => {
    requests.push({
      method: req.getMethod(),
      url: req.getURL(),
      offset: req.getHeader('Upload-Offset') ?? null,
      status: res.getStatus(),
      uploadOffset: res.getHeader('Upload-Offset') ?? null,
    })
  },
  // Wraps the client's own decision only to record it.
  onShouldRetry: (err, attempt, opts) => {
    const status = err.originalResponse ? err.originalResponse.getStatus() : 0
    const retry = defaultOptions.onShouldRetry(err, attempt, opts)
    errors.push({ message: String(err.message).split('\n')[0], status, retry })
    if (retry) retries += 1
    return retry
  },
  onSuccess: () => {
    report({ ok: true, url: upload.url })
    process.exit(0)
  },
  onError: (err) => {
    report({ ok: false, url: upload.url, error: String(err.message) })
    process.exit(1)
  },
})
upload.start()

setTimeout(() => {
  report({ ok: false, url: upload.url, error: 'no success nor error after 30 s' })
  process.exit(1)
}, 30_000)
