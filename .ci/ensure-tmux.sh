#!/usr/bin/env bash
# Make sure tmux is installed: the test of `sessiond top` drives it in a real terminal (in CI it
# must run, never skip). Idempotent; installs with apt-get when it is missing.
set -euo pipefail

if command -v tmux >/dev/null; then
    exit 0
fi
command -v apt-get >/dev/null || { echo "ensure-tmux: no tmux and no apt-get" >&2; exit 1; }
as_root=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "ensure-tmux: installing tmux needs root" >&2; exit 1; }
    as_root=(sudo -n)
fi
echo "ensure-tmux: installing tmux with apt-get"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux
command -v tmux >/dev/null || { echo "ensure-tmux: tmux is still missing" >&2; exit 1; }
