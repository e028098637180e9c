"""Plot the perplexity tables (docs/*.json, written by the table scripts) as docs/ppl.png.

    .venv/bin/python scripts/plot_ppl.py [--gla docs/gla_ppl.json] [--gqa docs/gqa_to_mla_ppl.json]

Left: the sharded-latent modes and bases on the trained DeepSeek-V2 fixture, change in
ppl against MLA for g = 2 and g = 4. Right: the gqa-to-mla stages on the trained GQA
fixture, ppl and KV values per token per layer.
"""

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gla", type=Path, default=REPO / "docs/gla_ppl.json")
    parser.add_argument("--gqa", type=Path, default=REPO / "docs/gqa_to_mla_ppl.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs/ppl.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gla = json.loads(args.gla.read_text())
    gqa = [r for r in json.loads(args.gqa.read_text()) if "kv_values" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})

    settings = list(dict.fromkeys(r["setting"] for r in gla))
    shard_counts = sorted({r["shards"] for r in gla})
    height = 0.8 / len(shard_counts)
    for i, g in enumerate(shard_counts):
        rows = {r["setting"]: r["ppl"] for r in gla if r["shards"] == g}
        mla = rows[settings[0]]
        values = [100 * (rows[s] / mla - 1) if s in rows else 0.0 for s in settings]
        ys = [k + i * height for k in range(len(settings))]
        left.barh(ys, values, height=height, label=f"g = {g}")
    left.set_yticks([k + height * (len(shard_counts) - 1) / 2 for k in range(len(settings))], settings, fontsize=8)
    left.invert_yaxis()
    left.set_xscale("symlog", linthresh=1.0)
    left.axvline(0, color="black", linewidth=0.8)
    left.set_xlabel("ppl change vs MLA, % (symlog)")
    left.set_title("MLA -> sharded latent: deepseek-v2-tiny, wikitext-2 test")
    left.legend()

    labels = [f"{r['stage']}  [{r['kv_values']} KV]" for r in gqa]
    right.barh(range(len(gqa)), [r["ppl"] for r in gqa], color="tab:green")
    right.set_yticks(range(len(gqa)), labels, fontsize=8)
    right.invert_yaxis()
    right.set_xlim(min(r["ppl"] for r in gqa) * 0.9, max(r["ppl"] for r in gqa) * 1.03)
    right.set_xlabel("ppl")
    right.set_title("GQA -> MLA stages: llama-gqa-tiny")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
