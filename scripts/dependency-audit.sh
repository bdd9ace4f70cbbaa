#!/usr/bin/env bash
# The dependency audit of scripts/test.sh: `cargo deny check` with deny.toml (licences: only
# permissive ones, compatible with Apache-2.0; sources: crates.io only; bans: no wildcard
# versions), then the security advisories.
#
# cargo-deny is installed once (pinned, --locked) under
# ${COMMONGROUND_CACHE:-~/.cache/commonground}/tools; about 6 minutes to build the first time.
# The advisory database is fetched from GitHub; on a machine that cannot reach it and has no
# earlier copy the advisory check is reported as skipped, with the reason, and the rest of the
# audit still fails the run on a finding.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSION=0.20.2
TOOLS=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/tools
DENY=$TOOLS/bin/cargo-deny
say() { echo "[audit] $*" >&2; }

if ! { [[ -x $DENY ]] && "$DENY" --version 2>/dev/null | grep -q " $VERSION"; }; then
  say "installing cargo-deny $VERSION into $TOOLS (once)"
  if ! cargo install cargo-deny --version "$VERSION" --locked --root "$TOOLS" --quiet \
      --target-dir "$TOOLS/build" >&2; then
    say "could not build cargo-deny"
    exit 1
  fi
  rm -rf "$TOOLS/build"
fi

export PATH="$TOOLS/bin:$PATH"
say "cargo deny check licenses bans sources"
if ! cargo deny --log-level error check licenses bans sources >&2; then
  say "a dependency breaks deny.toml (licence, source or ban): see above"
  exit 1
fi

say "cargo deny check advisories"
out=$(timeout 120 cargo deny --log-level error check advisories 2>&1)
rc=$?
if ((rc == 0)); then
  say "advisories ok"
elif grep -q "failed to fetch advisory database" <<<"$out"; then
  say "advisories SKIPPED: the advisory database cannot be fetched from this machine ($(grep -m1 -o 'Could not resolve host[^"]*' <<<"$out" || echo 'fetch failed'))"
else
  echo "$out" >&2
  say "a dependency has a security advisory: see above"
  exit 1
fi
