#!/usr/bin/env python3
"""Records real llama-server request/response pairs as test fixtures for kdllm's server teachers.

    python3 tools/record_engine_fixtures.py --server-bin PATH --model GGUF \
        [--out tests/fixtures/engines/llama-server]

PATH is a llama-server binary (tools/build-llama-server.sh builds one and prints its path), GGUF
the model it serves (tools/fetch-smollm2.sh fetches SmolLM2-135M-Instruct.Q4_1.gguf). The script
starts llama-server on a free localhost port (--parallel 2, -c 2048, -t 2, --no-repack), waits for
/health, makes the exchanges listed in main(), and writes one JSON file per exchange into --out:

    {"engine": "llama-server", "source": "recorded by ... <build> ... <date>",
     "request": {"method": "POST", "path": "/completion", "headers": {...}, "body": {...}},
     "status": 200, "response": {...the JSON body as returned...}}

"headers" is there only when the request sent one (only the API-key tests do; their keys are the
test keys test-key-123 and wrong-key-456, never a real one). "body" is null for a GET, the parsed
JSON for a POST, and a string holding the raw bytes for the one request whose body is not JSON
(error-bad-json.json). "response" is the body unmodified, except in error-nprobs-large.json where
the full-vocabulary top_logprobs list is cut (see "response_truncated" there). A second server with
--api-key test-key-123 answers the authentication exchanges. What the responses show (seed
determinism alone and under concurrency, prompt-cache reuse, logprob semantics) is printed to
stdout as one JSON object; the server logs go to --log-dir. Nothing else is written.

Standard library only (Python 3.11).
"""

import argparse
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Every sampling parameter of llama-server's /completion set to the value that makes it a no-op,
# and the sampler chain cut down to the temperature sampler (the chain always ends with "dist",
# which draws from the softmax of what is left). Either half alone would do; both together keep
# a request neutral whatever defaults the server was started with or read from the GGUF's
# general.sampling.* metadata. See /tmp/llama-server-findings.md for the source lines.
NEUTRAL = {
    "samplers": ["temperature"],
    "top_k": 0,  # default 40; <= 0 disables
    "top_p": 1.0,  # default 0.95; >= 1 disables
    "min_p": 0.0,  # default 0.05; <= 0 disables
    "typical_p": 1.0,  # default 1.0 (already off)
    "top_n_sigma": -1.0,  # default -1 (off)
    "xtc_probability": 0.0,  # default 0 (off)
    "repeat_penalty": 1.0,  # default 1.0 (off)
    "repeat_last_n": 0,  # default 64; 0 disables the penalties sampler outright
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "dry_multiplier": 0.0,  # default 0 (off)
    "dynatemp_range": 0.0,  # default 0 (off): plain temperature
    "mirostat": 0,  # default 0 (off); 1/2 would replace the whole chain
    "min_keep": 0,
    "logit_bias": [],
    "ignore_eos": False,
}


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg):
    print(f"record: {msg}", file=sys.stderr, flush=True)


class Server:
    def __init__(self, binary, model, log_path, extra=()):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(self.port),
                    "--parallel", "2", "-c", "2048", "-t", "2", "--no-repack", *extra]
        log("starting " + " ".join(self.cmd))
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}; see {log_path}")
            try:
                status, _ = self.request("GET", "/health")
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise SystemExit(f"llama-server did not become healthy in 180 s; see {log_path}")
            time.sleep(0.25)

    def request(self, method, path, body=None, raw=None, headers=None):
        """Returns (status, parsed JSON or text). body: JSON-encoded; raw: sent as is."""
        data = None
        hdrs = dict(headers or {})
        if raw is not None:
            data = raw.encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def dumps(o, indent=0):
    """JSON with 2-space indentation, but any value that fits in 100 characters on one line
    (a token list, a top_logprobs entry) written on one line: fixtures stay small and readable."""
    flat = json.dumps(o, ensure_ascii=False)
    if len(flat) <= 100 or not isinstance(o, (dict, list)) or not o:
        return flat
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(o, list) and all(not isinstance(x, (dict, list)) for x in o):
        return flat  # a long list of scalars (token ids, bytes) stays on one line too
    if isinstance(o, dict):
        parts = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {dumps(v, indent + 2)}" for k, v in o.items()]
        return "{\n" + ",\n".join(parts) + "\n" + pad + "}"
    parts = [inner + dumps(v, indent + 2) for v in o]
    return "[\n" + ",\n".join(parts) + "\n" + pad + "]"


class Recorder:
    def __init__(self, out, source):
        self.out = out
        self.source = source
        os.makedirs(out, exist_ok=True)

    def write(self, name, method, path, body, status, response, headers=None, extra=None):
        req = {"method": method, "path": path}
        if headers:
            req["headers"] = headers
        req["body"] = body
        doc = {"engine": "llama-server", "source": self.source, "request": req, "status": status,
               "response": response}
        if extra:
            doc.update(extra)
        text = dumps(doc) + "\n"
        assert json.loads(text) == doc
        with open(os.path.join(self.out, name), "w", encoding="utf-8") as f:
            f.write(text)
        log(f"wrote {name} ({len(text.encode())} bytes, HTTP {status})")

    def exchange(self, server, name, method, path, body=None, raw=None, headers=None, expect=None):
        status, response = server.request(method, path, body=body, raw=raw, headers=headers)
        if expect is not None and status != expect:
            log(f"warning: {name}: expected HTTP {expect}, got {status}: {str(response)[:300]}")
        self.write(name, method, path, raw if raw is not None else body, status, response, headers)
        return status, response


def completion(prompt, **kw):
    body = {"prompt": prompt, **NEUTRAL, "cache_prompt": True, "return_tokens": True,
            "post_sampling_probs": False, "n_probs": 5}
    body.update(kw)
    return body


def top(entry):
    return [(t["id"], t["logprob"]) for t in entry["top_logprobs"]]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "engines", "llama-server"))
    ap.add_argument("--log-dir", default=None, help="where the server logs go (default: $TMPDIR or /tmp, then record_engine_fixtures/)")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    log_dir = a.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "record_engine_fixtures")
    os.makedirs(log_dir, exist_ok=True)

    version = subprocess.run([a.server_bin, "--version"], capture_output=True, text=True)
    version_line = next((l for l in (version.stdout + version.stderr).splitlines() if l.startswith("version:")), "")
    log(version_line or "llama-server --version printed no version line")

    checks = {}
    srv = Server(a.server_bin, a.model, os.path.join(log_dir, "server.log"))
    try:
        _, props = srv.request("GET", "/props")
        build = props.get("build_info", "unknown build") if isinstance(props, dict) else "unknown build"
        date = datetime.date.today().isoformat()
        source = (f"recorded by tools/record_engine_fixtures.py from llama-server {build} "
                  f"({version_line.removeprefix('version: ') or 'no --version line'}; llama-cpp-python 0.3.36's "
                  f"vendored llama.cpp) serving {MODEL_NAME}, {date}")
        rec = Recorder(out, source)

        rec.exchange(srv, "health.json", "GET", "/health", expect=200)
        _, models = rec.exchange(srv, "models.json", "GET", "/v1/models", expect=200)
        model_id = models["data"][0]["id"]
        rec.exchange(srv, "props.json", "GET", "/props", expect=200)

        def render(text):
            _, r = srv.request("POST", "/apply-template", {"messages": [{"role": "user", "content": text}]})
            return r["prompt"]

        def ids_of(text):
            _, r = srv.request("POST", "/tokenize", {"content": text})
            return r["tokens"]

        body = {"messages": [{"role": "user", "content": "What is 2+3?"}]}
        _, tmpl = rec.exchange(srv, "apply-template.json", "POST", "/apply-template", body, expect=200)
        rendered = tmpl["prompt"]
        _, tok = rec.exchange(srv, "tokenize.json", "POST", "/tokenize",
                              {"content": rendered, "with_pieces": True}, expect=200)
        p = [t["id"] for t in tok["tokens"]]
        eos_ids = ids_of(props.get("eos_token", "")) if props.get("eos_token") else []
        checks["eos_token"] = {"text": props.get("eos_token"), "ids": eos_ids}

        sampled_body = completion(p, n_predict=16, seed=1234, temperature=1.0)
        _, sampled = rec.exchange(srv, "generate-sampled.json", "POST", "/completion", sampled_body, expect=200)

        hi = ids_of(render("Say hi."))
        _, greedy_stop = rec.exchange(srv, "generate-greedy-stop.json", "POST", "/completion",
                                      completion(hi, n_predict=64, seed=1234, temperature=0.0), expect=200)
        story = ids_of(render("Tell me a long story about a dragon."))
        _, length = rec.exchange(srv, "generate-length.json", "POST", "/completion",
                                 completion(story, n_predict=8, seed=1234, temperature=0.0), expect=200)
        if length.get("stop_type") != "limit":
            log(f"warning: generate-length.json stopped by {length.get('stop_type')!r}, not by the limit")
        checks["stop_types"] = {"greedy-stop": greedy_stop.get("stop_type"), "length": length.get("stop_type")}
        # EOS handling: is the end token in `tokens` and in `completion_probabilities`?
        checks["eos_stop"] = {"last_token": greedy_stop["tokens"][-1:], "last_prob_entry": greedy_stop["completion_probabilities"][-1],
                              "tokens_predicted": greedy_stop["tokens_predicted"], "n_tokens": len(greedy_stop["tokens"]),
                              "n_probs_entries": len(greedy_stop["completion_probabilities"])}

        # a stop string: generation ends when the text contains it, and the string is cut from `content`
        _, word = rec.exchange(srv, "generate-stop-word.json", "POST", "/completion",
                               completion(hi, n_predict=24, seed=1234, temperature=0.0, stop=["help"]), expect=200)
        checks["stop_word"] = {"stop_type": word.get("stop_type"), "stopping_word": word.get("stopping_word"),
                               "content": word.get("content"), "n_tokens": len(word.get("tokens", [])),
                               "n_probs_entries": len(word.get("completion_probabilities", [])),
                               "tokens_predicted": word.get("tokens_predicted")}

        # n_cmpl (alias "n"): several completions of one prompt in one request (at most --parallel);
        # the answer is a list, and child i samples with seed + i
        _, multi = rec.exchange(srv, "generate-n-cmpl.json", "POST", "/completion",
                                completion(p, n_predict=4, seed=1234, temperature=1.0, n_cmpl=2), expect=200)
        _, seed_next = srv.request("POST", "/completion", completion(p, n_predict=4, seed=1235, temperature=1.0))
        _, seed_same = srv.request("POST", "/completion", completion(p, n_predict=4, seed=1234, temperature=1.0))
        if isinstance(multi, list):
            checks["n_cmpl"] = {"n_results": len(multi), "indexes": [m.get("index") for m in multi],
                                "tokens": [m.get("tokens") for m in multi],
                                "seed": [m["generation_settings"]["seed"] for m in multi],
                                "separate_seed_1234": seed_same.get("tokens"), "separate_seed_1235": seed_next.get("tokens")}

        # the same seeded request again, sequentially (its prompt is now cached)
        _, repeat = rec.exchange(srv, "generate-seed-repeat.json", "POST", "/completion", sampled_body, expect=200)
        checks["seed_repeat_sequential_same_tokens"] = repeat["tokens"] == sampled["tokens"]

        # ... and concurrently with a different request in the other slot, twice
        other_body = completion(ids_of(render("Name three colors.")), n_predict=16, seed=99, temperature=1.0)
        runs = []
        for _ in range(2):
            results = {}
            barrier = threading.Barrier(2)

            def go(key, b):
                barrier.wait()
                results[key] = srv.request("POST", "/completion", b)

            ts = [threading.Thread(target=go, args=("a", sampled_body)), threading.Thread(target=go, args=("b", other_body))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            runs.append(results)
        a_tokens = [r["a"][1]["tokens"] for r in runs]
        b_tokens = [r["b"][1]["tokens"] for r in runs]
        checks["seed_concurrent"] = {
            "a_same_as_sequential": [t == sampled["tokens"] for t in a_tokens],
            "a_same_across_runs": a_tokens[0] == a_tokens[1],
            "b_same_across_runs": b_tokens[0] == b_tokens[1],
            "slots": [(r["a"][1]["id_slot"], r["b"][1]["id_slot"]) for r in runs],
            "a_first_logprobs_maxdiff_vs_sequential": max(
                abs(x["logprob"] - y["logprob"])
                for r in runs
                for x, y in zip(r["a"][1]["completion_probabilities"], sampled["completion_probabilities"])
                if x["id"] == y["id"]),
        }
        # again with cache_prompt false, so both prompts are evaluated from scratch in shared batches
        cold = []
        for _ in range(2):
            results = {}
            barrier = threading.Barrier(2)

            def go(key, b):
                barrier.wait()
                results[key] = srv.request("POST", "/completion", b)

            ts = [threading.Thread(target=go, args=("a", {**sampled_body, "cache_prompt": False})),
                  threading.Thread(target=go, args=("b", {**other_body, "cache_prompt": False}))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            cold.append(results)
        checks["seed_concurrent_cold_cache"] = {
            "a_same_as_sequential": [r["a"][1]["tokens"] == sampled["tokens"] for r in cold],
            "b_same_as_warm": [r["b"][1]["tokens"] == b_tokens[0] for r in cold],
            "prompt_n": [(r["a"][1]["timings"]["prompt_n"], r["b"][1]["timings"]["prompt_n"]) for r in cold],
            "a_logprobs_maxdiff_vs_sequential": max(
                abs(x["logprob"] - y["logprob"])
                for r in cold
                for x, y in zip(r["a"][1]["completion_probabilities"], sampled["completion_probabilities"])),
        }
        rec.write("generate-seed-concurrent.json", "POST", "/completion", sampled_body, runs[0]["a"][0], runs[0]["a"][1],
                  extra={"note": "sent at the same time as another /completion request (other prompt, seed 99) "
                                 "in the server's other slot"})

        # logprob semantics: the greedy and the T=1 request share the prompt, so the first position's
        # reported distribution should be the same if logprobs are the plain T=1 softmax
        hot = completion(p, n_predict=1, seed=1234, temperature=2.5)
        _, hot_r = srv.request("POST", "/completion", hot)
        checks["first_pos_top_logprobs"] = {
            "T=1": top(sampled["completion_probabilities"][0]),
            "T=0": top(srv.request("POST", "/completion", completion(p, n_predict=1, temperature=0.0))[1]["completion_probabilities"][0]),
            "T=2.5": top(hot_r["completion_probabilities"][0]),
        }
        cp = sampled["completion_probabilities"]
        checks["sampled_token_in_top5"] = [any(t["id"] == e["id"] for t in e["top_logprobs"]) for e in cp]
        checks["top5_logsumexp"] = [math.log(sum(math.exp(t["logprob"]) for t in e["top_logprobs"])) for e in cp]

        # post_sampling_probs: probabilities (not logs) of the candidates left after the sampler chain
        _, post = rec.exchange(srv, "generate-post-sampling.json", "POST", "/completion",
                               completion(p, n_predict=4, seed=1234, temperature=1.0, post_sampling_probs=True), expect=200)
        _, post_hot = srv.request("POST", "/completion", completion(p, n_predict=1, seed=1234, temperature=2.5, post_sampling_probs=True))
        checks["post_sampling_first_pos"] = {
            "T=1": [(t["id"], math.log(t["prob"])) for t in post["completion_probabilities"][0]["top_probs"]],
            "T=2.5": [(t["id"], math.log(t["prob"])) for t in post_hot["completion_probabilities"][0]["top_probs"]],
        }

        # BOS: a string prompt is tokenized with add_special=true, a list of ids is used as is
        _, as_text = srv.request("POST", "/completion", {"prompt": rendered, "n_predict": 0, "cache_prompt": False})
        _, as_ids = srv.request("POST", "/completion", {"prompt": p, "n_predict": 0, "cache_prompt": False})
        _, tok_special = srv.request("POST", "/tokenize", {"content": "Hi", "add_special": True})
        checks["bos"] = {"bos_token": props.get("bos_token"), "rendered_prompt_ids": len(p),
                         "tokens_evaluated_string_prompt": as_text.get("tokens_evaluated"),
                         "tokens_evaluated_id_prompt": as_ids.get("tokens_evaluated"),
                         "tokenize_Hi_add_special": tok_special.get("tokens"),
                         "n_predict_0_response_keys": sorted(as_ids) if isinstance(as_ids, dict) else as_ids}

        rec.exchange(srv, "v1-completions.json", "POST", "/v1/completions",
                     {"model": model_id, "prompt": p, "max_tokens": 8, "logprobs": 5, "temperature": 0, "seed": 1},
                     expect=200)

        # scoring: teacher-forced log-probabilities of the sampled completion, one request per position
        c = sampled["tokens"]
        checks["score"] = []
        for i in range(3):
            b = completion(p + c[:i], n_predict=1, seed=1234, temperature=1.0)
            _, r = rec.exchange(srv, f"score-pos-{i}.json", "POST", "/completion", b, expect=200)
            checks["score"].append({
                "prompt_len": len(b["prompt"]), "tokens_evaluated": r["tokens_evaluated"],
                "prompt_n": r["timings"]["prompt_n"], "cache_n": r["timings"]["cache_n"],
                "tokens_cached": r["tokens_cached"],
                "top5_matches_generation": top(r["completion_probabilities"][0]) == top(cp[i]),
                "top5_maxdiff_vs_generation": max(abs(x[1] - y[1]) for x, y in zip(top(r["completion_probabilities"][0]), top(cp[i]))),
            })
        # the same, with the completion's own token forced by logit_bias (pre-sampling logprobs are
        # computed from the raw logits, so the bias only picks which token's logprob is reported)
        checks["score_forced"] = []
        for i in range(3):
            b = completion(p + c[:i], n_predict=1, seed=1234, temperature=0.0, logit_bias=[[c[i], 1000.0]])
            _, r = rec.exchange(srv, f"score-forced-pos-{i}.json", "POST", "/completion", b, expect=200)
            e = r["completion_probabilities"][0]
            checks["score_forced"].append({
                "forced": c[i], "got": e["id"], "logprob": e["logprob"], "generation_logprob": cp[i]["logprob"],
                "prompt_n": r["timings"]["prompt_n"], "cache_n": r["timings"]["cache_n"],
                "top5_matches_generation": top(e) == top(cp[i]),
            })

        # errors and limits
        b = completion(p, n_predict=1, seed=1234, temperature=1.0, n_probs=100000)
        status, r = srv.request("POST", "/completion", b)
        extra = None
        if status == 200 and isinstance(r, dict) and r.get("completion_probabilities"):
            e = r["completion_probabilities"][0]
            n = len(e["top_logprobs"])
            checks["n_probs_100000"] = {"returned": n, "logsumexp": math.log(sum(math.exp(t["logprob"]) for t in e["top_logprobs"])),
                                        "bytes": len(json.dumps(r))}
            e["top_logprobs"] = e["top_logprobs"][:8]
            extra = {"response_truncated": f"completion_probabilities[0].top_logprobs had {n} entries "
                                           f"(the whole vocabulary); only the first 8 are kept here"}
        rec.write("error-nprobs-large.json", "POST", "/completion", b, status, r, extra=extra)

        rec.exchange(srv, "error-field-range.json", "POST", "/completion",
                     completion(p, n_predict=-5, temperature=1.0))
        rec.exchange(srv, "error-bad-json.json", "POST", "/completion", raw='{"prompt": [1, 2, 3], "n_predict": ')
        rec.exchange(srv, "error-model-404.json", "POST", "/v1/completions",
                     {"model": "no-such-model", "prompt": p, "max_tokens": 4, "temperature": 0})
        rec.exchange(srv, "error-invalid-token.json", "POST", "/completion",
                     completion(p + [10_000_000], n_predict=1, temperature=1.0))
        rec.exchange(srv, "error-context.json", "POST", "/completion",
                     completion([1] * 1100, n_predict=1, temperature=1.0))
        rec.exchange(srv, "error-echo.json", "POST", "/v1/completions",
                     {"model": model_id, "prompt": p, "max_tokens": 1, "logprobs": 5, "echo": True, "temperature": 0})
        rec.exchange(srv, "metrics-or-slots.json", "GET", "/slots")
    finally:
        srv.stop()

    auth = Server(a.server_bin, a.model, os.path.join(log_dir, "server-auth.log"), extra=["--api-key", "test-key-123"])
    try:
        b = completion(p, n_predict=2, seed=1234, temperature=0.0)
        rec.exchange(auth, "error-unauthorized.json", "POST", "/completion", b, expect=401)
        rec.exchange(auth, "error-wrong-key.json", "POST", "/completion", b,
                     headers={"Authorization": "Bearer wrong-key-456"}, expect=401)
        rec.exchange(auth, "auth-ok.json", "POST", "/completion", b,
                     headers={"Authorization": "Bearer test-key-123"}, expect=200)
        status, _ = auth.request("GET", "/health")
        checks["auth_health_without_key"] = status
        status, _ = auth.request("GET", "/v1/models")
        checks["auth_models_without_key"] = status
    finally:
        auth.stop()

    print(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
