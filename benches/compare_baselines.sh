#!/usr/bin/env bash
# Regression guard for the criterion benches (not a timed test): compares two saved baselines and lists every
# benchmark whose median got slower by more than a threshold.
#
#   cargo bench -- --save-baseline before      # on the old commit
#   cargo bench -- --save-baseline after       # on the new commit
#   benches/compare_baselines.sh before after  # exit 1 if anything is >10% slower
#
# Options: -t PCT   threshold in percent (default 10)
#          -d DIR   criterion's output directory (default ${CARGO_TARGET_DIR:-target}/criterion)
# Reads DIR/<benchmark id>/<baseline>/estimates.json (median.point_estimate, nanoseconds) with jq.
# Exit status: 0 no regression, 1 at least one regression, 2 usage error or nothing to compare.
set -euo pipefail

threshold=10
dir="${CARGO_TARGET_DIR:-target}/criterion"
usage() {
    echo "usage: $0 [-t PCT] [-d CRITERION_DIR] BASELINE CANDIDATE" >&2
    exit 2
}
while getopts "t:d:h" opt; do
    case $opt in
        t) threshold=$OPTARG ;;
        d) dir=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || usage
base=$1
cand=$2
command -v jq >/dev/null || { echo "error: jq is required" >&2; exit 2; }
[[ $threshold =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "error: threshold must be a number: $threshold" >&2; exit 2; }
[ -d "$dir" ] || { echo "error: no criterion directory $dir (run cargo bench first, or pass -d)" >&2; exit 2; }

compared=0
slower=0
missing=0
report=""
while IFS= read -r -d '' b; do
    id=${b#"$dir"/}
    id=${id%/"$base"/estimates.json}
    c="$dir/$id/$cand/estimates.json"
    if [ ! -f "$c" ]; then
        missing=$((missing + 1))
        continue
    fi
    line=$(jq -rn --slurpfile b "$b" --slurpfile c "$c" --arg id "$id" --argjson t "$threshold" '
        ($b[0].median.point_estimate) as $old | ($c[0].median.point_estimate) as $new
        | (($new / $old - 1) * 100) as $pct
        | if $pct > $t then "SLOWER\t\($id)\t\($old / 1e6 * 1000 | round / 1000)\t\($new / 1e6 * 1000 | round / 1000)\t+\($pct * 10 | round / 10)%"
          else "ok" end')
    compared=$((compared + 1))
    if [ "$line" != ok ]; then
        slower=$((slower + 1))
        report+="${line#SLOWER	}"$'\n'
    fi
done < <(find "$dir" -path "*/$base/estimates.json" -print0 | sort -z)

if [ "$compared" -eq 0 ]; then
    echo "error: no benchmark has both baselines '$base' and '$cand' under $dir" >&2
    exit 2
fi
echo "compared $compared benchmarks ($base -> $cand, median), threshold +$threshold%; $missing only in '$base'"
if [ "$slower" -gt 0 ]; then
    echo "$slower slower than the threshold:"
    { printf 'benchmark\t%s ms\t%s ms\tchange\n' "$base" "$cand"; printf '%s' "$report"; } | column -t -s $'\t'
    exit 1
fi
echo "no regression"
