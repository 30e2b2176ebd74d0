#!/usr/bin/env bash
# The predictive-shadowing benchmark: every trace in ../shared/traces (or
# PREDICT_TRACES) replayed by `shadowctl simulate` with every policy, at pool
# capacities of 10 %, 100 % and 300 % of the device and copy budgets of 4 and
# 16 MiB/s (PREDICT_CAPACITIES, PREDICT_BUDGETS), with the daemon's default
# retention (7 days) and a short one (PREDICT_RETENTIONS, default "7d 5min").
#
# One table per trace: stalls per 1000 segment-writes for each policy, then
#   vs reactive  the default policy's stalls / the best of lru and heat
#   oracle gain  the share of the oracle's gain the default policy achieves,
#                gain = stalls(best reactive) - stalls(policy); "-" when the
#                oracle gains nothing
#   target       ok when the share is >= 60 % and, where the oracle saves more
#                than half of the reactive stalls, the default stalls at most
#                half as often as the best reactive baseline
# and the time and memory per million requests of the slowest policy.
# Raw results: var/bench/predict-<timestamp>.json.
#
# Environment: BUILD_DIR (default build), PREDICT_POLICIES, PREDICT_DEFAULT
# (the policy judged, default auto).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shadowctl=$build_dir/ctl/shadowctl
[[ -x $shadowctl ]] || die "$shadowctl not built (scripts/build.sh)"
traces_dir=${PREDICT_TRACES_DIR:-$root/../shared/traces}
read -ra traces <<<"${PREDICT_TRACES:-$(ls "$traces_dir"/*.csv.gz "$traces_dir"/*.csv "$traces_dir"/*.txt 2>/dev/null | tr '\n' ' ')}"
((${#traces[@]})) || die "no traces in $traces_dir"
read -ra policies <<<"${PREDICT_POLICIES:-none lru heat priority ewma holt-winters arima sequential auto oracle}"
read -ra capacities <<<"${PREDICT_CAPACITIES:-10% 100% 300%}"
read -ra budgets <<<"${PREDICT_BUDGETS:-4MiB 16MiB}"
read -ra retentions <<<"${PREDICT_RETENTIONS:-7d 5min}"
default_policy=${PREDICT_DEFAULT:-auto}

mkdir -p var/bench
out=var/bench/predict-$stamp.json
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for t in "${traces[@]}"; do
  for r in "${retentions[@]}"; do
    for c in "${capacities[@]}"; do
      for b in "${budgets[@]}"; do
        for p in "${policies[@]}"; do
          log "$(basename "$t") retention $r capacity $c budget $b policy $p"
          "$shadowctl" simulate --trace "$t" --policy "$p" --pool-capacity "$c" --budget "$b" \
            --retention "$r" --no-progress --json |
            $py -c 'import json,sys; d=json.load(sys.stdin); d.update(capacity=sys.argv[1], budget=sys.argv[2], retention=sys.argv[3]); print(json.dumps(d))' "$c" "$b" "$r" >>"$tmp"
        done
      done
    done
  done
done
$py - "$tmp" "$out" "$default_policy" "${policies[@]}" <<'EOF'
import json, sys
src, out, default, *policies = sys.argv[1:]
rows = [json.loads(l) for l in open(src)]
json.dump(rows, open(out, "w"), indent=1)
by = {}
for r in rows:
    by.setdefault(r["trace"], {}).setdefault((r["retention"], r["capacity"], r["budget"]), {})[r["policy"]] = r
ok_all = True
for trace, groups in by.items():
    any_row = next(iter(next(iter(groups.values())).values()))
    print(f"\n{trace}: {any_row['requests']:,} requests, {any_row['segment_writes']:,} segment-writes, "
          f"device {any_row['device_bytes'] / 2**30:.2f} GiB, {any_row['trace_seconds']:.0f} s")
    head = ["retention", "capacity", "budget"] + policies + ["vs reactive", "oracle gain", "target"]
    table = [head]
    for (ret, cap, bud), res in groups.items():
        cells = [ret, cap, bud + "/s"]
        for p in policies:
            cells.append(f"{res[p]['stalls_per_1k_writes']:.2f}" if p in res else "-")
        reactive = [res[p]["stalls"] for p in ("lru", "heat") if p in res]
        verdict = "-"
        ratio = share = "-"
        if reactive and default in res:
            best = min(reactive)
            d = res[default]["stalls"]
            ratio = f"{d / best:.2f}" if best else "-"
            if "oracle" in res:
                gain = best - res["oracle"]["stalls"]
                if gain > 0:
                    s = (best - d) / gain
                    share = f"{100 * s:.0f} %"
                    ok = s >= 0.6
                    if res["oracle"]["stalls"] < best / 2:
                        ok = ok and d <= best / 2
                    verdict = "ok" if ok else "MISSED"
                    ok_all = ok_all and ok
                else:
                    verdict = "ok" if d <= best else "MISSED"
                    ok_all = ok_all and d <= best
        cells += [ratio, share, verdict]
        table.append(cells)
    w = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.rjust(w[i]) if i >= 3 else c.ljust(w[i]) for i, c in enumerate(r)))
    slow = max((r for g in groups.values() for r in g.values()), key=lambda r: r["sim_seconds_per_million_requests"])
    print(f"slowest: {slow['policy']} {slow['sim_seconds_per_million_requests']:.2f} s per million requests "
          f"(+{slow['read_seconds'] * 1e6 / max(1, slow['requests']):.2f} s reading), peak RSS "
          f"{max(r['peak_rss_bytes'] for g in groups.values() for r in g.values()) / 2**20:.0f} MiB, "
          f"policy state up to {max(r['policy_memory_bytes'] for g in groups.values() for r in g.values()) / 2**20:.1f} MiB")
print(f"\ndefault policy: {default}; every row on target: {'yes' if ok_all else 'no'}")
print(f"raw results: {out}")
EOF
