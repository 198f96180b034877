#!/usr/bin/env bash
# Fill the empty dnd_repo/ submodule folder from a snapshot of DnD (workspace/ and scripts/ at the
# pinned commit 60e2192, under one top folder), so the tests that compare with DnD's own code run
# where GitHub cannot be reached. dnd_repo stays a gitlink: git status does not list what this writes.
#   bash scripts/fetch_dnd.sh [--if-present] [TARBALL]
# TARBALL defaults to ../shared/dnd/Drag-and-Drop-LLMs-60e2192.tar.gz (relative to the repository
# root). A dnd_repo/ that already holds workspace/ is left as it is. With --if-present a missing
# TARBALL is a note, not an error (CI: the DnD tests then skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."

if_present=0
if [ "${1:-}" = "--if-present" ]; then if_present=1; shift; fi
[ $# -le 1 ] || { echo "usage: bash scripts/fetch_dnd.sh [--if-present] [TARBALL]" >&2; exit 2; }
tarball=${1:-../shared/dnd/Drag-and-Drop-LLMs-60e2192.tar.gz}
target=dnd_repo

if [ -d "$target/workspace" ]; then
  echo "fetch_dnd: $target/ is already populated; left as it is"
  exit 0
fi
if [ ! -f "$tarball" ]; then
  if [ "$if_present" = 1 ]; then
    echo "fetch_dnd: no DnD snapshot at $tarball; the tests that need DnD will skip"
    exit 0
  fi
  echo "fetch_dnd: DnD snapshot $tarball does not exist" >&2
  exit 1
fi
if [ -e "$target" ] && [ -n "$(ls -A "$target")" ]; then
  echo "fetch_dnd: $target/ is not empty but has no workspace/; empty it first (nothing was changed)" >&2
  exit 1
fi
tops=$(tar -tzf "$tarball" | cut -d/ -f1 | sort -u) || { echo "fetch_dnd: cannot read $tarball as a .tar.gz" >&2; exit 1; }
if [ "$(printf '%s\n' "$tops" | wc -l)" != 1 ]; then
  echo "fetch_dnd: $tarball must hold one top folder (e.g. Drag-and-Drop-LLMs/), found: $(echo $tops)" >&2
  exit 1
fi

# Extract beside the target, check, then rename into place: an interrupted run leaves dnd_repo/ empty.
staging=$(mktemp -d ".$target.fetch.XXXXXX")
trap 'rm -rf "$staging"' EXIT
tar -xzf "$tarball" --strip-components=1 --no-same-owner -C "$staging"
if [ ! -d "$staging/workspace/dnd/tokenizer" ]; then
  echo "fetch_dnd: $tarball has no workspace/dnd/tokenizer under its top folder; not a DnD snapshot" >&2
  exit 1
fi
chmod 755 "$staging"
[ ! -e "$target" ] || rmdir "$target"
mv "$staging" "$target"
trap - EXIT
echo "fetch_dnd: filled $target/ from $tarball"
