#!/usr/bin/env python3
"""PNG figures from the JSON that kvtier's tools print; run by `kvtier plot`.

    plot.py RESULT.json --out DIR [--json]

RESULT.json holds the JSON of one of (recognised by its fields):
  kvtier eval --json      -> eval_per_layer.png: recall@k and coverage per layer
  kvtier replay --json    -> replay_hit_rate.png: hit rate against GPU-tier blocks per
                             policy; replay_stall.png: the modelled stall likewise;
                             replay_heatmap.png: the acquired blocks over decoding steps
  kvtier explain --json   -> explain_blocks.png: each block's estimated and true share
  kvtier-bench ... --json -> bench_<name>.png: each figure beside its anchor (memcpy, fio,
                             RocksDB, the GPU's peak, InfLLM, the oracle)
The file may hold other text around the JSON (a bench's table): the JSON object lines
are used. Exit status: 0 written, 2 unreadable input, unknown JSON, or no matplotlib.
"""
import argparse
import json
import os
import re
import sys


def fail(msg, as_json):
    if as_json:
        print(json.dumps({"ok": False, "error": {"code": "InvalidArgument", "message": msg}}))
    else:
        print("kvtier plot: " + msg, file=sys.stderr)
    sys.exit(2)


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text)
        return doc if isinstance(doc, list) else [doc]
    except ValueError:
        pass
    docs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                docs.append(json.loads(line))
            except ValueError:
                continue
    return docs


def kind_of(doc):
    if not isinstance(doc, dict):
        return None
    if "runs" in doc and "heatmap" in doc:
        return "replay"
    if "per_block" in doc:
        return "explain"
    if "per_layer" in doc and "recall" in doc:
        return "eval"
    if "bench" in doc:
        return "bench"
    return None


def save(fig, out_dir, name, written):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    written.append(path)


def plot_eval(plt, doc, out_dir, written):
    layers = [p["layer"] for p in doc["per_layer"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(layers, [p["recall"] for p in doc["per_layer"]], "o-", label="recall@%d" % doc["top_k"])
    ax.plot(layers, [p["coverage"] for p in doc["per_layer"]], "s-", label="coverage")
    ax.axhline(doc["recall"], color="C0", ls=":", lw=1)
    ax.axhline(doc["coverage"], color="C1", ls=":", lw=1)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.02)
    ax.set_title("kvtier eval: %d tokens, %s summary, %s backend (dotted: means)"
                 % (doc["tokens"], doc["summary"], doc["backend"]), fontsize=9)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    save(fig, out_dir, "eval_per_layer.png", written)
    plt.close(fig)


def plot_replay(plt, doc, out_dir, written):
    series = {}
    for r in doc["runs"]:
        label = r["policy"] + (" + prefetch" if r["prefetch"] else "")
        series.setdefault(label, []).append(r)
    for metric, ylabel, name in (("hit_rate", "hit rate", "replay_hit_rate.png"),
                                 ("stall_us_per_step", "stall per step (us)", "replay_stall.png")):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for label, runs in series.items():
            runs = sorted(runs, key=lambda r: r["gpu_blocks"])
            ax.plot([r["gpu_blocks"] for r in runs], [r[metric] for r in runs], "o-", label=label)
        ax.set_xlabel("GPU-tier blocks")
        ax.set_ylabel(ylabel)
        if metric == "hit_rate":
            ax.set_ylim(0, 1.02)
        ax.set_title("kvtier replay: %d steps x %d layers, %.0f us compute, %.0f GB/s link"
                     % (doc["steps"], doc["layers"], doc["compute_us"], doc["link_gbps"]),
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, out_dir, name, written)
        plt.close(fig)
    counts = doc["heatmap"]["counts"]
    if counts and counts[0]:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        sb, bb = doc["heatmap"].get("step_bin", 1), doc["heatmap"].get("block_bin", 1)
        im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis",
                       origin="lower",
                       extent=(-0.5 * bb, (len(counts[0]) - 0.5) * bb,
                               -0.5 * sb, (len(counts) - 0.5) * sb))
        ax.set_xlabel("block" + (" (%d per cell)" % bb if bb > 1 else ""))
        ax.set_ylabel("decoding step" + (" (%d per cell)" % sb if sb > 1 else ""))
        ax.set_title("acquired blocks over decoding steps (layers acquiring each)", fontsize=9)
        fig.colorbar(im, ax=ax, label="layers")
        save(fig, out_dir, "replay_heatmap.png", written)
        plt.close(fig)


def plot_explain(plt, doc, out_dir, written):
    rows = doc["per_block"]
    blocks = [r["block"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(blocks, [r["true_share"] for r in rows], "-", color="C0", lw=1, label="true share")
    ax.plot(blocks, [r["est_share"] for r in rows], "-", color="C1", lw=1, alpha=0.8,
            label="index estimate")
    sel = [r for r in rows if r["selected"]]
    ax.plot([r["block"] for r in sel], [r["true_share"] for r in sel], "o", color="C2",
            label="selected")
    top = [r for r in rows if r["oracle_topk"]]
    ax.plot([r["block"] for r in top], [r["true_share"] for r in top], "x", color="C3",
            label="oracle top-%d" % doc["top_k"])
    ax.axvspan(-0.5, doc["sink_blocks"] - 0.5, color="grey", alpha=0.15)
    ax.axvspan(doc["local_begin"] - 0.5, doc["local_end"] - 0.5, color="grey", alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("block (shaded: sinks and local window)")
    ax.set_ylabel("share of attention")
    ax.set_title("kvtier explain: layer %d, step %d: recall %.3f, coverage %.3f"
                 % (doc["layer"], doc["step"], doc["recall"], doc["coverage"]), fontsize=9)
    ax.legend(fontsize=8)
    save(fig, out_dir, "explain_blocks.png", written)
    plt.close(fig)


# A figure's anchor: the peer or bound the bench measures it against.
ANCHOR_RULES = [
    (r"^(put|get)(_batch)?_gbps$", lambda m: "memcpy_%s_gbps" % m.group(1)),
    (r"^(put|get)_op_us$", lambda m: "memcpy_%s_op_us" % m.group(1)),
    (r"^(write|read)_gbps$", lambda m: "fio_%s_gbps" % m.group(1)),
    (r"^(h2d|d2h)_batched_gbps$", lambda m: "%s_peak_gbps" % m.group(1)),
    (r"^score_us_(.+)$", lambda m: "score_bound_us_" + m.group(1)),
    (r"^(select_us|recall|needle_rate)_(.+)$", lambda m: "infllm_%s_%s" % (m.group(1), m.group(2))),
    (r"^coverage_(.+)$", lambda m: "oracle_coverage_" + m.group(1)),
    (r"^trace_(hit_rate|stall_us_per_step)$", lambda m: "trace_%s_infllm" % m.group(1)),
]


def anchor_label(key):
    for word, label in (("memcpy", "memcpy"), ("fio", "fio"), ("peak", "peak"),
                        ("bound", "bound"), ("infllm", "InfLLM"), ("oracle", "oracle")):
        if word in key:
            return label
    return "anchor"


def plot_bench(plt, doc, out_dir, written):
    pairs = []
    for key, value in doc.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        for pattern, anchor in ANCHOR_RULES:
            m = re.match(pattern, key)
            if m and isinstance(doc.get(anchor(m)), (int, float)):
                pairs.append((key, anchor(m)))
                break
    if not pairs:
        return False
    cols = min(4, len(pairs))
    rows = (len(pairs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for i, (key, anchor) in enumerate(pairs):
        ax = axes[i // cols][i % cols]
        ax.bar([0, 1], [doc[key], doc[anchor]], color=["C0", "C7"])
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["kvtier", anchor_label(anchor)], fontsize=8)
        ax.set_title(key, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for j in range(len(pairs), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("kvtier-bench %s: each figure beside its anchor" % doc["bench"], fontsize=9)
    save(fig, out_dir, "bench_%s.png" % re.sub(r"[^a-z0-9_-]", "_", str(doc["bench"])), written)
    plt.close(fig)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is missing: apt-get install python3-matplotlib", args.json)
    try:
        docs = load_documents(args.result)
    except OSError as e:
        fail("%s: %s" % (args.result, e.strerror), args.json)
    docs = [d for d in docs if kind_of(d)]
    if not docs:
        fail("%s holds no JSON of kvtier eval, replay, explain or kvtier-bench" % args.result,
             args.json)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail("--out %s: %s" % (args.out, e.strerror), args.json)
    written, kinds = [], []
    for doc in docs:
        kind = kind_of(doc)
        try:
            if kind == "eval":
                plot_eval(plt, doc, args.out, written)
            elif kind == "replay":
                plot_replay(plt, doc, args.out, written)
            elif kind == "explain":
                plot_explain(plt, doc, args.out, written)
            elif not plot_bench(plt, doc, args.out, written):
                continue
        except (KeyError, TypeError, ValueError) as e:
            fail("%s: the %s JSON lacks or mistypes a field (%s)" % (args.result, kind, e),
                 args.json)
        except OSError as e:
            fail("writing under %s: %s" % (args.out, e.strerror), args.json)
        kinds.append(kind)
    if not written:
        fail("%s: nothing to plot (a bench JSON without figure/anchor pairs)" % args.result,
             args.json)
    if args.json:
        files = [{"path": p, "bytes": os.path.getsize(p)} for p in written]
        print(json.dumps({"ok": True, "kinds": kinds, "files": files}, separators=(",", ":")))
    else:
        for p in written:
            print("wrote %s (%d bytes)" % (p, os.path.getsize(p)))


if __name__ == "__main__":
    main()
