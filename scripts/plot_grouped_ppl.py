"""Plot the grouped-mode table on the ratio-8 fixture (docs/grouped_ppl_ratio8.json, written by
scripts/grouped_ppl_table.py) as docs/grouped_ppl_ratio8.png.

    .venv/bin/python scripts/plot_grouped_ppl.py [--table docs/grouped_ppl_ratio8.json]

One bar per setting and g: ppl change against MLA (symlog), labelled with what one rank holds
per token and layer (KV values) and per layer (attention parameters), at TP = g.
"""

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=REPO / "docs/grouped_ppl_ratio8.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs/grouped_ppl_ratio8.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(args.table.read_text())
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    shard_counts = sorted({r["shards"] for r in rows})
    fig, ax = plt.subplots(figsize=(13, 7))
    height = 0.8 / len(shard_counts)
    for i, g in enumerate(shard_counts):
        by_setting = {r["setting"]: r for r in rows if r["shards"] == g}
        mla = by_setting[settings[0]]["ppl"]
        ys = [k + i * height for k in range(len(settings))]
        values = [100 * (by_setting[s]["ppl"] / mla - 1) if s in by_setting else 0.0 for s in settings]
        ax.barh(ys, values, height=height, label=f"g = TP = {g}")
        for y, s, v in zip(ys, settings, values):
            if s in by_setting:
                r = by_setting[s]
                ax.annotate(f"{r['kv_values_per_token_per_layer_per_rank']} KV, "
                            f"{r['attention_params_per_layer_per_rank'] / 1e3:.0f}k params",
                            (v, y), xytext=(4 if v >= 0 else -4, 0), textcoords="offset points",
                            ha="left" if v >= 0 else "right", va="center", fontsize=7)
    ax.set_yticks([k + height * (len(shard_counts) - 1) / 2 for k in range(len(settings))], settings, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=0.1)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("ppl change vs MLA, % (symlog); labels: per rank, per layer")
    ax.set_title("Grouped (GLA) conversions of deepseek-v2-tiny-ratio8, wikitext-2 test")
    ax.legend(loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
