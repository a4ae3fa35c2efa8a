#!/usr/bin/env bash
# `kvpred bench handoff` end to end on small random models: the three stages
# come up as forked processes (the default) and as threads over tcp loopback,
# requests go through, and the JSON it writes parses and holds every figure
# with positive TTFTs; no stage process outlives the benchmark; bad options
# are usage errors (exit 2).
# usage: cli_bench_handoff.sh KVPRED WORKDIR
set -u
KVPRED=$1
DIR=$2
rm -rf "$DIR" && mkdir -p "$DIR" && cd "$DIR" || exit 1
fails=0 passes=0
ok() { passes=$((passes + 1)); }
bad() { echo "FAIL: $*"; fails=$((fails + 1)); }

if timeout 120 "$KVPRED" bench handoff --quick --small --json out.json >out.txt 2>&1; then
  ok
else
  bad "bench handoff --quick --small exited $?: $(cat out.txt)"
fi
grep -q "stages run as 3 processes" out.txt && grep -qE "^  (PASS|MISS) " out.txt && ok \
  || bad "table or goal lines missing: $(cat out.txt)"
# the forked stages are children of the benchmark: none may be left
sleep 0.2
left=$(pgrep -f "bench handoff --quick --small" | wc -l)
[ "$left" -eq 0 ] && ok || bad "$left stage processes left after the benchmark"

if timeout 120 "$KVPRED" bench handoff --quick --small --lens 64 --stages threads \
    >threads.txt 2>&1 && grep -q "stages run as threads" threads.txt \
    && grep -qE "^    64   128 " threads.txt; then
  ok
else
  bad "bench handoff --stages threads: $(cat threads.txt)"
fi
if timeout 120 "$KVPRED" bench handoff --quick --small --lens 64 --stage-threads 1 \
    --stage-cpus 0 --json pinned.json >pinned.txt 2>&1 \
    && grep -q "OpenBLAS threads aux/pred/dec 1/1/1, CPUs 0/0/0" pinned.txt \
    && python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); assert j["stages"]=="processes" and j["stage_threads"]=={"aux":1,"predictor":1,"decoder":1} and j["stage_cpus"]["decoder"]=="0", j' pinned.json; then
  ok
else
  bad "bench handoff --stage-threads 1 --stage-cpus 0: $(cat pinned.txt)"
fi

if python3 - out.json <<'EOF'; then ok; else bad "out.json: see above"; fi
import json, sys
j = json.load(open(sys.argv[1]))
assert j["bench"] == "handoff", j.get("bench")
for k in ("cores", "blas_threads", "dtype", "reps", "results", "goals", "stages",
          "stage_threads"):
    assert k in j, "missing " + k
rows = j["results"]
assert [(r["prompt_tokens"], r["chunk_tokens"]) for r in rows] == [(128, 128), (512, 128)], rows
for r in rows:
    for k in ("inproc_ttft_ms", "pipeline_ttft_ms", "client_ttft_ms", "handoff_ms",
              "handoff_bound_ms", "wire_aux_gbps", "wire_base_gbps", "base_prefill_ms",
              "ttft_ratio", "speedup_inproc", "speedup_pipeline", "flops_ratio"):
        assert k in r, "missing " + k
    for k in ("inproc_ttft_ms", "pipeline_ttft_ms", "client_ttft_ms", "base_prefill_ms",
              "flops_ratio", "handoff_bound_ms"):
        assert r[k] > 0, "%s = %r at %d tokens" % (k, r[k], r["prompt_tokens"])
    assert r["handoff_ms"] >= 0 and r["handoff_ms"] < r["pipeline_ttft_ms"], r
    assert r["client_ttft_ms"] >= r["pipeline_ttft_ms"] * 0.9, r
    for leg in ("raw_aux", "raw_base"):
        x = r[leg]
        assert x["oneway_gbps"] > 0 and x["stream_gbps"] > 0 and x["message_bytes"] > 0, x
assert j["stages"] == "processes", j["stages"]
assert j["stage_threads"] == {"aux": 0, "predictor": 0, "decoder": 0}, j["stage_threads"]
g = j["goals"]
for k in ("pipeline_ttft_within_5pct", "handoff_within_bound", "wire_at_90pct_of_raw",
          "speedup_at_90pct_of_flops"):
    assert g[k]["result"] in ("PASS", "MISS") and g[k]["rows"] >= 1, (k, g.get(k))
EOF

# usage errors
for args in "--dtype f8" "--lens 1" "--chunks 0" "--reps 0" "--aux a.gguf" "--small extra" \
  "--stages fork" "--stage-threads 1,2" "--stage-threads 0" "--stage-cpus 0/1" \
  "--stage-cpus x" "--credits 0" "--credits 65" "--tail 0" "--tail -2"; do
  # shellcheck disable=SC2086
  "$KVPRED" bench handoff $args >/dev/null 2>&1
  rc=$?
  [ "$rc" -eq 2 ] && ok || bad "bench handoff $args exited $rc, wanted 2"
done

echo "$passes passed, $fails failed"
[ "$fails" -eq 0 ]
