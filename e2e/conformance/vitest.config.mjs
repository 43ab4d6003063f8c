import { defineConfig } from "vitest/config"

// Keep vitest's default timeouts (5 s per test/hook): the suite sets its own
// longer timeouts where it needs them. The server under test must use a short
// long-poll timeout (~500 ms), which run.sh configures.
export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    // One file only; the suite's tests are sequential within it.
    watch: false,
  },
})
