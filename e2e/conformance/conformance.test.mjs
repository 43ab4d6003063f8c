// Runs the upstream Durable Streams conformance suite (pinned in package.json)
// against the server at CONFORMANCE_BASE_URL. Use ./run.sh rather than calling
// vitest directly: it builds and starts ds-server with a short long-poll timeout.
//
// The package's own CLI finds no tests when installed from npm (vitest skips
// node_modules), so we import the suite here instead.
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_BASE_URL
if (!baseUrl) {
  throw new Error("CONFORMANCE_BASE_URL is required (e.g. http://127.0.0.1:4437)")
}

runConformanceTests({
  baseUrl,
  // Opt-in block "Reserved subscription APIs" (6 tests); skipped unless set.
  subscriptions: process.env.CONFORMANCE_SUBSCRIPTIONS === "1",
})
