"""bench/speed.py's report: each target against its measured value, and bench/results/speed.md."""
from __future__ import annotations

from simskip_faiss.training.export import PARITY_TOLERANCE, SAMPLE_RECALL

from speed_common import D, HIDDEN, OTHER_WIDTHS, OWN, TARGETS
from speed_where_time_goes import EF


def targets(r: dict) -> list[dict]:
    """Each issue target with the measured value and whether it is met (sections not run are left out)."""
    T, rows = TARGETS, []

    def add(target: str, value: float, met: bool) -> None:
        rows.append({"target": target, "value": value, "met": bool(met)})

    shipped = f"default {r.get('shipped_precision', 'fp32')}"
    hb = r.get("hnsw_breakdown")
    if hb and shipped in hb:
        v = hb[shipped]["refined_vs_raw"]
        add(f"HNSW32 (efSearch {EF}) one query, one thread, {shipped} refiner: RefinedIndex.search / raw FAISS <= "
            f"{T['hnsw_refined_vs_raw']} at equal 10-recall@10 (efSearch {hb[shipped]['efSearch']})", round(v, 3), v <= T["hnsw_refined_vs_raw"])
    if r.get("defaults"):
        prec, width = r.get("shipped_precision", "fp32"), r["defaults"]["choice"]["hidden"]
        for row in r["defaults"]["rows"]:
            if row["data"] == "wordnet-minilm" and row["hidden"] == width:
                gap = max(abs(row["test"][prec][k] - row["test"]["fp32"][k]) for k in row["test"]["fp32"])
                add(f"WordNet test metrics of the shipped refiner ({prec}, hidden {width}, seed {row['seed']}) within "
                    f"{T['shipped_metric_gap']} of its fp32 refiner's (largest gap)", round(gap, 4), gap <= T["shipped_metric_gap"])
    for k, sr in r.get("search", {}).items():
        if k in ("Flat", "IVF"):
            m = sr["median_us"]  # (runs before this figure was recorded: from the medians)
            extra = sr.get("extra_over_raw_minus_refine_us", m["refined_index"] - m["raw_faiss"] - m["refine_only"])
            add(f"{sr['factory']} one query: RefinedIndex.search - raw FAISS - refine <= {T['flat_ivf_extra_us']} us",
                round(extra, 1), extra <= T["flat_ivf_extra_us"])
    c = r.get("concurrency")
    if c:
        for clock in ("wall", "cpu"):
            for k, v in c[f"vs_batch_{clock}"].items():
                if k.startswith("batcher"):
                    add(f"{c['callers']} concurrent single-query callers through MicroBatcher ({k.split(' ', 1)[1]}): >= "
                        f"{T['concurrent_vs_batch']} x batch-of-{c['callers']} throughput "
                        f"({'wall clock' if clock == 'wall' else 'per CPU-second'})", round(v, 3), v >= T["concurrent_vs_batch"])
    for th in sorted({x["threads"] for x in r.get("throughput", [])}):
        worst = min(x["vs_roofline"] for x in r["throughput"] if x["threads"] == th and x["batch"] >= 1024 and x["path"] == "ort_fp32")
        add(f"fp32 refine throughput, batch >= 1024, {th} thread(s): >= {T['roofline_ratio']} x numpy roofline", round(worst, 3),
            worst >= T["roofline_ratio"])
    if "single_vector" in r:
        v = r["single_vector"]["default fp32"]["median_us"]
        add(f"single-vector refine, default model fp32: <= {T['single_vector_us']} us median", round(v, 1), v <= T["single_vector_us"])
    for k, sr in r.get("search", {}).items():
        o = sr["overhead_us"]
        add(f"RefinedIndex.search {k} batch 1: <= FAISS + refine + {T['search_overhead_us']} us (median vs the same steps by hand)",
            round(o, 1), o <= T["search_overhead_us"])
    for k, q in r.get("quality", {}).items():
        if "recall10_vs_own_fp32" in q:
            v = q["recall10_vs_own_fp32"]
            add(f"fast option '{k}': 10-recall@10 vs {OWN[k]} refiner >= {T['recall_parity']}", round(v, 4), v >= T["recall_parity"])
    for k, g in r.get("ingest", {}).items():
        if k.startswith("refined"):
            add(f"ingest {k}: peak RSS <= index + {T['ingest_rss_over_index_mb']:.0f} MB", round(g["peak_over_index_mb"], 1),
                g["peak_over_index_mb"] <= T["ingest_rss_over_index_mb"])
    for f, sr in r.get("native", {}).items():
        if isinstance(sr, dict):
            add(f"native linear {f}: latency within {T['native_vs_hand']:.0%} of hand-built", round(sr["native_vs_hand"], 4),
                abs(sr["native_vs_hand"]) <= T["native_vs_hand"])
    return rows


def markdown(r: dict) -> str:
    e = r["environment"]
    L = [f"# Speed bench\n\nLast command: `{r['command']}` — {e['cpu']}, {e['cores']} cores, load average at start "
         f"{e['loadavg_start'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}; {r['seconds']:.0f} s. "
         f"numpy {e['numpy']}, torch {e['torch']}, onnxruntime {e['onnxruntime']}, faiss {e['faiss']}.",
         "", "Threads: " + "; ".join(f"{k}: {v}" for k, v in e["threads"].items()) + ".",
         f"Sections 1–8 measure models trained without the guard (α = 1, the hardest parity case): d={D}, hidden={HIDDEN} "
         f"(and {', '.join(map(str, OTHER_WIDTHS))}), depth 1, {r.get('model', {}).get('epochs')} epochs on {r.get('model', {}).get('data')}. Shipped precision "
         f"(the CLI's default, config.DEFAULT_PRECISION): **{r.get('shipped_precision', 'fp32')}**. Ratios are medians of interleaved runs in one process."]
    if r.get("runs"):
        L += ["", "| section | command | run at | load average start → end |", "|---|---|---|---|"]
        L += [f"| {k} | `{v['command']}` | {v['date']} | {v['loadavg_start'][0]:.1f} → {v['loadavg_end'][0]:.1f} |" for k, v in r["runs"].items()]
        L.append("Sections not listed are from the earlier full run (`python bench/speed.py`: 3 epochs, fp32 refiner in section 3, before the single-query changes).")
    L += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    L += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in r["targets"]]
    hb = r.get("hnsw_breakdown")
    if hb:
        raw = hb["raw"]
        L += ["", f"## 7. One query, one thread, HNSW32 on {hb['data']} ({hb['n_corpus']:,} × {D}): where the time goes "
              f"(median µs of {hb['n_queries']} queries × {hb['rounds']} rounds)", "",
              f"Raw FAISS at efSearch {EF}: {raw['us']:.1f} µs, 10-recall@10 {raw['recall10']:.4f} against exact search in the raw "
              f"space, {raw['ndis']:.0f} distance computations per query (faiss.cvar.hnsw_stats.ndis). Each refined index runs "
              "at the smallest efSearch reaching that recall against exact search in its own space. Stages are timed alone; "
              "interference = (refine then FAISS, back to back) − refine − FAISS: each evicts the other's cache; handling = "
              "RefinedIndex.search − back to back − checks.", "",
              "| refiner | efSearch (recall) | ndis (at 64) | checks | refine | FAISS (× raw) | interference | handling | RefinedIndex.search | × raw |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for k, o in hb.items():
            if isinstance(o, dict) and "us" in o and k != "raw":
                m = o["us"]
                L.append(f"| {k} | {o['efSearch']} ({o['recall10']:.4f}) | {o['ndis']:.0f} ({o['ndis_at_64']:.0f}) | {m['checks']:.1f} | "
                         f"{m['refine']:.1f} | {m['faiss']:.1f} ({o['faiss_vs_raw']:.2f}) | {o['interference_us']:+.1f} | "
                         f"{o['handling_us']:+.1f} | {m['search']:.1f} | **{o['refined_vs_raw']:.3f}** |")
    c = r.get("concurrency")
    if c:
        L += ["", f"## 8. {c['callers']} concurrent single-query callers (HNSW32 as in 7, {c['refiner']} refiner; "
              f"{c['n_queries']} queries per run, median of {c['reps']} interleaved runs; FAISS and onnxruntime 1 thread per calling thread)", "",
              "batch = one thread searching 8 queries per call; serial = one thread, one query per call; threads = 8 threads calling "
              "RefinedIndex.search directly; batcher = the 8 threads through MicroBatcher(max_batch=8, max_wait_us=W), or "
              "max_batch=4 where named (one batch fills while the other is searched).", "",
              "| path | queries/s (wall clock) | × batch-of-8 (per-run median) | queries per CPU-second | × batch-of-8 |", "|---|---|---|---|---|"]
        L += [f"| {k} | {c['qps_wall'][k]:,.0f} | {c['vs_batch_wall'][k]:.2f} | {c['qps_cpu'][k]:,.0f} | {c['vs_batch_cpu'][k]:.2f} |"
              for k in c["qps_wall"]]
        L.append(f"\nBatcher results identical to the batch search: {c['batcher_results_equal_batch']}.")
    dfl = r.get("defaults")
    if dfl:
        ch = dfl["choice"]
        cap = f"at most {dfl['epochs']} epochs" if dfl.get("epochs") else "TrainConfig's epochs"
        cap += " — PARTIAL: the run stopped before every data set and width was measured" if dfl.get("partial") else ""
        L += ["", f"## 9. Default precision and width: guarded `fit` per data set and width ({cap}), "
              "exported fp32 and int8, exact search; test metrics over EvalConfig's test queries, val over the guard's", "",
              f"Choice: **{ch['precision']}** (int8 parity on every data set at the default width, hidden **{ch['hidden']}**: "
              f"{ch['int8_parity_everywhere']}; 10-recall@10 ≥ {TARGETS['recall_parity']}, metric tolerance {ch['tolerance']}; "
              f"other widths failing it: {', '.join(ch.get('int8_parity_fails_other_widths', [])) or 'none'}). Models whose int8 export fails its "
              f"parity check (max abs error vs torch > {PARITY_TOLERANCE['int8']}) or its neighbour check (10-recall@10 vs fp32 "
              f"< {SAMPLE_RECALL} on a corpus sample: 1,000 rows as queries over up to 20,000 others) ship fp32 (export's \"auto\"): "
              f"{', '.join(ch.get('fp32_fallbacks', [])) or 'none'}. For information, the worst test-metric loss "
              f"by width vs the default width's fp32 refiner (one seed, one guarded signal per data set, so mostly where the "
              f"guard put α; the width's evidence is bench/results/robustness.md): "
              + ", ".join(f"{w}: {v:+.4f}" for w, v in ch.get("worst_test_loss_vs_default_fp32", {}).items()) + ".", "",
              "| data | hidden | seed | α | int8 max abs err (ships) | int8 vs fp32 10-recall@10: test queries / corpus sample | largest |int8 − fp32| test / val | test metrics fp32 (raw) |",
              "|---|---|---|---|---|---|---|---|"]
        for x in dfl["rows"]:
            gt = max(abs(x["test"]["int8"][k] - x["test"]["fp32"][k]) for k in x["test"]["fp32"])
            gv = max(abs(x["val"]["int8"][k] - x["val"]["fp32"][k]) for k in x["val"]["fp32"])
            err8 = x.get("int8_meta", {}).get("parity_max_abs_err", float("nan"))
            ships = "int8" if x.get("int8_passes_check", True) else "fp32"
            sample = f" / {x['int8_sample_recall']:.4f}" if "int8_sample_recall" in x else ""
            L.append(f"| {x['data']} | {x['hidden']} | {x['seed']} | {x['alpha']:g} | {err8:.4f} ({ships}) | {x['recall10_int8_vs_fp32']:.4f}{sample} | {gt:.4f} / {gv:.4f} | "
                     + ", ".join(f"{k} {v:.4f} ({x['raw']['test'][k]:.4f})" for k, v in x["test"]["fp32"].items()) + " |")
    if "throughput" in r:
        L += ["", "## 1. Refine throughput (vectors/s; × = time of numpy's two matmuls / time of this path)", "",
              "| threads | batch | path | vectors/s | GFLOP/s | × numpy roofline |", "|---|---|---|---|---|---|"]
        L += [f"| {x['threads']} | {x['batch']} | {x['path']} | {x['vectors_per_s']:,.0f} | {x['gflops']:.1f} | {x['vs_roofline']:.2f} |"
              for x in r["throughput"]]
    if "single_vector" in r:
        L += ["", "## 2. Single-vector refine latency (Refiner.transform, 1 thread, µs)", "", "| refiner | median | p90 | file bytes |", "|---|---|---|---|"]
        L += [f"| {k} | {v['median_us']:.1f} | {v['p90_us']:.1f} | {r['files'].get(k, '')} |" for k, v in r["single_vector"].items()]
    if "search" in r:
        L += ["", f"## 3. Single-query search on {r.get('search_data', 'clustered unit vectors')} ({r['search_n']:,} × {D}), k=10, 1 thread, "
              f"{r.get('search_precision', 'fp32')} refiner (median µs)", "",
              "Raw FAISS at the factory's knob; the refined index at the smallest knob whose 10-recall@10 against exact search in its "
              "own space reaches raw's against exact search in the raw space. ndis: distance computations per query (FAISS's counters; "
              "Flat: ntotal), refined at the raw knob → at its own.", "",
              "Interference = by hand − refine alone − FAISS alone: refining and searching back to back evict each other's "
              "working set from the core's L2 cache (timed alone, each runs warm).", "",
              "| index | knob raw → refined (recall) | ndis raw | ndis refined | raw FAISS | FAISS alone on refined index | refine alone | refine + FAISS by hand | interference | RefinedIndex.search | overhead vs by hand (per-turn median) | RefinedIndex − raw − refine | RefinedIndex / raw FAISS |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, s in r["search"].items():
            m = s["median_us"]
            knob = (f"{s['param'][0]} {s['param'][1]} → {s['matched_param'][1]} ({s['raw_recall10']:.4f} → {s['recall10']:.4f})"
                    if s.get("matched_param") else "exact")
            nd = f"{s['ndis_same_param']:.0f} → {s['ndis']:.0f}" if "ndis" in s else ""
            L.append(f"| {s['factory']} | {knob} | {s.get('raw_ndis', float('nan')):.0f} | {nd} | {m['raw_faiss']:.1f} | {m['refined_faiss_only']:.1f} | {m['refine_only']:.1f} | "
                     f"{m['by_hand']:.1f} | {s.get('interference_us', float('nan')):+.1f} | {m['refined_index']:.1f} | {s['overhead_us']:+.1f} | "
                     f"{s.get('extra_over_raw_minus_refine_us', float('nan')):+.1f} | "
                     f"{s['refined_vs_raw']:.3f} |")
    n = r.get("native", {})
    if n:
        L += ["", f"## 4. Native linear path (MLP refiner distilled to a linear map, fit R² = {n['fit_r2']:.3f}; 1 thread, median µs)", "",
              "| index | to_faiss (native) | hand-built IndexPreTransform | numpy path (RefinedIndex) | native/hand − 1 (per-turn median) | same results as hand | 10-recall@10 vs numpy path |",
              "|---|---|---|---|---|---|---|"]
        for f, s in n.items():
            if isinstance(s, dict):
                m = s["median_us"]
                L.append(f"| {f} | {m['native_to_faiss']:.1f} | {m['hand_built']:.1f} | {m['numpy_path']:.1f} | {s['native_vs_hand']:+.3f} | "
                         f"{s['same_results_as_hand']} | {s['recall10_native_vs_numpy_path']:.4f} |")
    if "quality" in r:
        L += ["", f"## 5. Quality parity on {r['model']['data']} ({r['quality_n']})", "",
              "10-recall@10 = |top-10 ∩ top-10 of the reference| / 10 (FAISS's intersection measure), exact search. "
              "A smaller width is another model, not a precision of the same one: its parity column compares its int8 "
              "to its own fp32, and its task quality is the labels column (raw = no refiner).", "",
              "| refiner | 10-recall@10 vs default fp32 | 10-recall@10 vs own fp32 (parity) | labels precision@10 |", "|---|---|---|---|"]
        L += [f"| {k} | {q['recall10_vs_fp32']:.4f} | {q['recall10_vs_own_fp32']:.4f} | {q.get('labels_precision@10', float('nan')):.4f} |"
              if "recall10_vs_own_fp32" in q else
              f"| {k} | {q['recall10_vs_fp32']:.4f} | — | {q.get('labels_precision@10', float('nan')):.4f} |" for k, q in r["quality"].items()]
    if r.get("ingest"):
        L += ["", f"## 6. Streamed ingest of {r['ingest_n']:,} × {D} from a .npy memmap into Flat (subprocess each; {r['ingest_threads']} threads)", "",
              "| path | seconds | vectors/s | × raw | peak RSS (VmHWM) MB | index MB | peak − index MB | RSS before add MB |",
              "|---|---|---|---|---|---|---|---|"]
        for k, g in r["ingest"].items():
            L.append(f"| {k} | {g['seconds']:.1f} | {g['vectors_per_s']:,.0f} | {g['throughput_vs_raw']:.3f} | {g['peak_rss_bytes'] / 1e6:,.0f} | "
                     f"{g['index_bytes'] / 1e6:,.0f} | {g['peak_over_index_mb']:+.0f} | {g['before']['VmRSS'] / 1e6:.0f} |")
    return "\n".join(L) + "\n"
