#!/usr/bin/env bash
# Accuracy per round for every update codec, from one script: runs `fedslice sim` (100
# clients, 2 label shards each, C = 0.1, E = 5, B = 10, lr 0.05, mlp, ROUNDS rounds) once per
# codec (topk also without its sparse refit) and writes
#   OUT/codec_curves.csv   round,codec,accuracy,bytes_up  (one row per codec and round)
#   OUT/codec_curves.png   the curves (gnuplot)
#   OUT/codec_summary.csv  codec, mean accuracy over the last 10 rounds, upload bytes per round
#                          and their fraction of fp32
#
#   scripts/codec_curves.sh [ROUNDS] [OUT]      (defaults: 100, docs/codecs)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${FEDSLICE_BUILD_DIR:-$root/build}
rounds=${1:-100}
out=${2:-$root/docs/codecs}
# Each run: the codec, then any extra flags; the whole string names the run.
codecs=(fp32 fp16 int8 int4 "qsgd:16" sign "topk:0.01" "topk:0.01 --sparse-refit 0"
  "topk:0.01:layer")
fedslice=$build/tools/fedslice
[[ -x "$fedslice" ]] || { echo "missing $fedslice: run scripts/build.sh first" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "gnuplot is missing: apt-get install gnuplot-nox" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
echo "round,codec,accuracy,bytes_up" > "$out/codec_curves.csv"
echo "codec,mean_accuracy_last10,bytes_up_per_round,fraction_of_fp32" > "$out/codec_summary.csv"
fp32_bytes=""
for run in "${codecs[@]}"; do
  read -r -a words <<< "$run"
  codec=$run
  dir="$work/${run//[^A-Za-z0-9]/_}"
  echo "== $run"
  "$fedslice" sim --model mlp --data "$root/data/mnist-10k" --clients 100 --partition shards \
    --rounds "$rounds" --fraction 0.1 --epochs 5 --batch 10 --lr 0.05 --seed 1 \
    --codec "${words[0]}" "${words[@]:1}" --out-dir "$dir" --eval-every "$rounds" | tail -n 1
  # metrics.csv columns: round,accuracy,...,bytes_up (9th)
  awk -F, -v c="$codec" 'NR > 1 { print $1 "," c "," $2 "," $9 }' "$dir/metrics.csv" \
    >> "$out/codec_curves.csv"
  summary=$(awk -F, -v r="$rounds" 'NR > 1 { if ($1 > r - 10) { s += $2; n++ } b += $9; m++ }
              END { printf "%.4f,%.0f", s / n, b / m }' "$dir/metrics.csv")
  bytes=${summary#*,}
  [[ -n "$fp32_bytes" ]] || fp32_bytes=$bytes
  fraction=$(awk -v b="$bytes" -v f="$fp32_bytes" 'BEGIN { printf "%.4f", b / f }')
  echo "$codec,$summary,$fraction" >> "$out/codec_summary.csv"
done

# One colour per run (gnuplot's default cycle has eight).
colours=(9400d3 009e73 56b4e9 e69f00 f0e442 0072b2 e51e10 000000 999999)
plot_lines=()
i=0
for codec in "${codecs[@]}"; do
  plot_lines+=("'$out/codec_curves.csv' using 1:(strcol(2) eq '$codec' ? \$3 * 100 : 1/0) with lines lw 2 lc rgb '#${colours[i % ${#colours[@]}]}' title '$codec'")
  i=$((i + 1))
done
gnuplot <<GNUPLOT
set terminal pngcairo size 1000,600 noenhanced
set output '$out/codec_curves.png'
set datafile separator ','
set key bottom right
set grid
set xlabel 'round'
set ylabel 'test accuracy (%)'
set yrange [50:95]
set title 'fedslice sim: 100 clients, shards, C=0.1, E=5, B=10, mlp: accuracy per round by update codec'
plot $(IFS=,; echo "${plot_lines[*]}")
GNUPLOT
echo "wrote $out/codec_curves.csv, $out/codec_curves.png and $out/codec_summary.csv"
column -s, -t < "$out/codec_summary.csv" 2>/dev/null || cat "$out/codec_summary.csv"
