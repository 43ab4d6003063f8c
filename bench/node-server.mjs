// Starts the Node reference server (@durable-streams/server, a library with no CLI) for
// bench/run.sh. The package is installed outside the repo; run.sh passes where.
//
//   DS_BENCH_NODE_MODULES  node_modules directory holding @durable-streams/server
//   PORT                   port on 127.0.0.1
//   DATA_DIR               file-backed store directory; unset means the in-memory store
//   LONG_POLL_TIMEOUT_MS   long-poll timeout (default 60000, long enough for idle-reader runs)
import path from "node:path"
import { pathToFileURL } from "node:url"

const modules = process.env.DS_BENCH_NODE_MODULES
if (!modules) {
  console.error("node-server.mjs: DS_BENCH_NODE_MODULES is not set")
  process.exit(2)
}
const entry = path.join(modules, "@durable-streams", "server", "dist", "index.js")
const { DurableStreamTestServer } = await import(pathToFileURL(entry).href)

const options = {
  host: "127.0.0.1",
  port: Number(process.env.PORT ?? 4437),
  longPollTimeout: Number(process.env.LONG_POLL_TIMEOUT_MS ?? 60000),
}
if (process.env.DATA_DIR) {
  options.dataDir = process.env.DATA_DIR
}
const server = new DurableStreamTestServer(options)
await server.start()
console.error(`node reference server on http://${options.host}:${options.port} (${options.dataDir ? "file" : "memory"})`)

let stopping = false
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    if (stopping) return
    stopping = true
    await server.stop()
    process.exit(0)
  })
}
