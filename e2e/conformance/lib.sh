#!/usr/bin/env bash
# Helpers shared by run.sh and through-envoy.sh (sourced, not run). Node is already required by
# the suite, so it does the socket work.

# Prints a free TCP port on 127.0.0.1.
free_port() {
  node -e '
    const s = require("node:net").createServer();
    s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });
  '
}

# Prints the HTTP status of GET $1 (000 if no answer within a second).
http_status() {
  node -e '
    const ctl = new AbortController();
    setTimeout(() => ctl.abort(), 1000).unref();
    fetch(process.argv[1], { signal: ctl.signal })
      .then((r) => console.log(r.status))
      .catch(() => console.log("000"));
  ' "$1"
}
