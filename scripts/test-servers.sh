#!/bin/sh
# Servers the test suite starts itself: PostgreSQL's server binaries (initdb, pg_ctl) and headless Chromium.
# When they are missing and this runs as root on Debian, they are installed as .ci/run needs them; elsewhere
# one line names what the tests will skip and the command that installs it.
missing=""
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=" postgresql"
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$missing chromium chromium-driver"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the test servers:$missing (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null ||
    echo "make test: installing$missing failed; the tests that need them will be skipped"
else
  echo "make test: not installed:$missing; the tests that need them will be skipped. Install with: sudo apt-get install -y$missing"
fi
