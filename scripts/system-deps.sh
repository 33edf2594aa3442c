#!/usr/bin/env bash
# Debian packages the project needs beyond Python: a CJK font for plots, Chromium for the clerk-page test, and
# PostgreSQL for the feedback-store test. Installs only what is missing, so a second run costs nothing.
# Usage: scripts/system-deps.sh [font|browser|postgres ...]   (no argument: all of them)
set -euo pipefail
declare -A GROUPS_=(
  [font]="fonts-noto-cjk"
  [browser]="chromium chromium-driver"
  [postgres]="postgresql"
)
wanted=("$@")
[ ${#wanted[@]} -eq 0 ] && wanted=(font browser postgres)
missing=()
for group in "${wanted[@]}"; do
  for pkg in ${GROUPS_[$group]:?unknown group $group}; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: apt-get not found; install these by hand: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "system-deps: installing ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
