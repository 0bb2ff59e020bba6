#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) measured the way `trit bench generate` measures trit: a forward
pass over the first N tokens of the same text (pp), then M tokens decoded greedily one at a time from an
empty cache (tg), on a fixed number of threads; median of `--reps` runs after one warm-up. Prints one
JSON object. `trit bench generate --peer PYTHON` runs it in the same run as trit's own measurement.
"""
import argparse
import json
import statistics
import time

import llama_cpp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True, help="file whose first tokens form the prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    llm = llama_cpp.Llama(
        model_path=a.model,
        n_ctx=a.prompt_tokens + a.gen_tokens + 8,
        n_batch=a.prompt_tokens,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    text = open(a.text, "rb").read()[: 64 * 1024]
    prompt = llm.tokenize(text, add_bos=False)[: a.prompt_tokens]
    pp, tg = [], []
    for rep in range(a.reps + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - t
        llm.reset()
        tok = prompt[0]
        t = time.perf_counter()
        for _ in range(a.gen_tokens):
            llm.eval([tok])
            logits = llm.scores[llm.n_tokens - 1]
            tok = int(logits.argmax())
        gen_s = time.perf_counter() - t
        if rep > 0:
            pp.append(len(prompt) / prompt_s)
            tg.append(a.gen_tokens / gen_s)
    print(json.dumps({
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens_per_sec": statistics.median(pp),
        "gen_tokens_per_sec": statistics.median(tg),
    }))


if __name__ == "__main__":
    main()
