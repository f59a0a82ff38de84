#!/bin/bash
# 1 replica (2 CPUs, 2 torch threads) vs 2 replicas (1 CPU, 1 thread each) on a local Ray, interleaved twice;
# each: 8 greedy requests one at a time / all at once / one at a time (batching.json), then 32 concurrent
# streamed requests of the 8-kind mix (load.json). bash benchmarks/results/serve/replicas/measure.sh
cd "$(dirname "$0")/../../../.."
OUT=benchmarks/results/serve/replicas
for run in "1 2 a" "2 1 a" "1 2 b" "2 1 b"; do
    set -- $run; n=$1; c=$2; round=$3
    port=$((18400 + n * 10 + RANDOM % 10))
    dir=$OUT/replicas-$n-$round
    mkdir -p $dir
    .venv/bin/tokensift serve --replicas $n --replica-cpus $c --threads $c --port $port --max-batch 8 --max-tokens 32 \
        > $dir/server.out 2> $dir/server.err &
    pid=$!
    for i in $(seq 600); do grep -q "serving at" $dir/server.out && break; sleep 1; done
    echo "$(date +%T) start $n replicas round $round (load $(cut -d' ' -f1 /proc/loadavg))"
    .venv/bin/python benchmarks/serve_load.py batching --url http://127.0.0.1:$port --max-tokens 32 --out $dir > /dev/null 2>> $dir/load.err
    .venv/bin/python benchmarks/serve_load.py load --url http://127.0.0.1:$port --requests 32 --max-tokens 32 --baseline 0 --out $dir > /dev/null 2>> $dir/load.err
    echo "$(date +%T) done $n replicas round $round (load $(cut -d' ' -f1 /proc/loadavg))"
    kill -TERM $pid; wait $pid; echo "server exit $?"
done
