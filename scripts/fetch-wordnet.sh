#!/usr/bin/env bash
# Fetches WordNet 3.0 (Debian's wordnet-base 1:3.0-37, pinned by sha256) and unpacks its synset files
# data.{noun,verb,adj,adv} with Princeton's license (copyright) into
# ${TRIT_DATA:-$HOME/.cache/trit/data}/wordnet-3.0/, outside the repository so checkouts share one copy.
# The TBT recipe's definition-modelling task is built from them (models/src/wordnet.rs). Idempotent.
set -euo pipefail
dest=${TRIT_DATA:-$HOME/.cache/trit/data}/wordnet-3.0
if [[ -e $dest/data.noun && -e $dest/data.verb && -e $dest/data.adj && -e $dest/data.adv && -e $dest/copyright ]]; then
    exit 0
fi
sha=61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752
url=https://deb.debian.org/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download goes through the machine's configured mirror; the pool URL is the fallback.
if ! (cd "$tmp" && apt-get download -qq wordnet-base=1:3.0-37 >/dev/null 2>&1); then
    python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$url" "$tmp/wordnet-base.deb"
fi
deb=$(ls "$tmp"/*.deb)
echo "$sha  $deb" | sha256sum --check --quiet
dpkg-deb -x "$deb" "$tmp/x"
mkdir -p "$dest"
cp "$tmp"/x/usr/share/wordnet/data.{noun,verb,adj,adv} "$tmp/x/usr/share/doc/wordnet-base/copyright" "$dest/"
